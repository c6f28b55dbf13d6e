"""The augmented super-model of network augmentation (NetAug, Cai et al., ICLR 2022) for a zoo model.

:func:`make_dynamic` builds, from a zoo model of the tiny per-branch widths, the same family at the largest
augmented widths with every grouped conv, linear and batch norm replaced by its dynamic-width version
(:mod:`groupnet.modules.dynamic`), and a :class:`WidthSpace` that says which layers share which width:

- a *width choice* per layer output that no residual ties (stem, every plain conv, the inner conv of residual
  blocks, the first block of a stage whose shortcut is a projection, the head conv): its width is
  ``round(base * m)`` for a multiplier ``m`` of ``width_mults``, ``base`` being the tiny model's width;
- blocks with an identity shortcut inherit the incoming width (the residual sum needs equal widths);
- an *expand choice* per inverted bottleneck with an expand conv: its inner width is
  ``round(t * f * input width)`` for ``f`` of ``expand_mults`` (``t`` the tiny expansion ratio).

Both lists contain 1, so the configuration with every multiplier 1 (:meth:`WidthSpace.min_config`) is exactly the
tiny model, and the largest multipliers give the allocated widths. One configuration holds for all K branches.

Supported families: ``small_cnn``, ``resnet`` with basic blocks, ``wrn`` (width augmentation) and ``mobilenetv2``
(width and expansion). Bottleneck ResNets and ResNeXt raise a ValueError naming what is missing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from groupnet.models import build_from_spec
from groupnet.models.base import GroupedClassifier
from groupnet.models.mobilenetv2 import InvertedResidual, inner_width
from groupnet.models.resnet import BasicBlock
from groupnet.models.small_cnn import ConvBNReLU
from groupnet.models.spec import ArchSpec
from groupnet.models.wrn import PreActBlock
from groupnet.modules import GroupedBatchNorm2d, GroupedConv2d, GroupedLinear
from groupnet.modules.dynamic import (
    DynamicGroupedBatchNorm2d,
    DynamicGroupedConv2d,
    DynamicGroupedLinear,
    dynamic_layer_types,
    to_dynamic,
)

__all__ = ["DEFAULT_EXPAND_MULTS", "DEFAULT_WIDTH_MULTS", "SUPPORTED_FAMILIES", "WidthChoice", "WidthSpace",
           "check_multipliers", "check_supported_spec", "make_dynamic", "widened_spec"]

DEFAULT_WIDTH_MULTS = (1.0, 1.8, 2.6)
DEFAULT_EXPAND_MULTS = (1.0, 1.6, 2.2, 2.8)
SUPPORTED_FAMILIES = ("small_cnn", "resnet", "wrn", "mobilenetv2")
_PASSIVE = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Identity, nn.Dropout)


def check_multipliers(name: str, mults: Sequence[float]) -> tuple[float, ...]:
    """Multipliers as a sorted tuple; they must be finite numbers >= 1 and contain 1 (the tiny model)."""
    values = tuple(mults)
    if not values:
        raise ValueError(f"{name} must hold at least one multiplier (1 is the tiny model)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise ValueError(f"{name} must be numbers >= 1 (a multiplier below 1 would shrink the tiny model), "
                             f"got {list(values)}")
    if 1 not in values:
        raise ValueError(f"{name} must contain 1 (the tiny model is the configuration of all multipliers 1), "
                         f"got {list(values)}")
    return tuple(sorted({float(v) for v in values}))


@dataclass(eq=False)
class WidthChoice:
    """One independently sampled width of the super-model (see the module docstring)."""

    name: str
    kind: str  # "width" or "expand"
    base: float  # width: the tiny width; expand: the tiny expansion ratio t
    options: tuple[float, ...]
    source: WidthChoice | None = None  # expand: the choice that gives the block's input width
    #: Producers and consumers of these channels, when their order may be changed (inner channels of a block).
    producers: list[nn.Module] = field(default_factory=list)
    consumers: list[nn.Module] = field(default_factory=list)

    def width(self, config: Mapping[str, float], widths: Mapping[str, int]) -> int:
        m = config[self.name]
        if self.kind == "width":
            return max(1, int(round(self.base * m)))
        assert self.source is not None
        return inner_width(self.base * m, widths[self.source.name])


class WidthSpace:
    """The choices of a dynamic model and the layers they drive; sets, samples and freezes configurations."""

    def __init__(self, model: nn.Module, choices: list[WidthChoice],
                 wiring: list[tuple[nn.Module, WidthChoice | int | None, WidthChoice | int | None]]) -> None:
        self.model = model
        self.choices = choices
        self.wiring = wiring
        self.config: dict[str, float] = self.min_config()

    # ------------------------------------------------------------------------------------------ configurations
    def min_config(self) -> dict[str, float]:
        """The tiny model: every multiplier 1."""
        return {c.name: 1.0 for c in self.choices}

    def max_config(self) -> dict[str, float]:
        """The largest augmented model: every multiplier at its maximum (the allocated widths)."""
        return {c.name: max(c.options) for c in self.choices}

    def sample(self, generator: torch.Generator, *, widths: bool = True, expands: bool = True) -> dict[str, float]:
        """One configuration, each choice drawn uniformly and independently from ``generator``; ``widths=False``
        (or ``expands=False``) keeps those choices at 1 while still drawing them, so the stream does not depend on
        which kinds are augmented."""
        config = {}
        for c in self.choices:
            i = int(torch.randint(len(c.options), (1,), generator=generator))
            keep = (c.kind == "width" and not widths) or (c.kind == "expand" and not expands)
            config[c.name] = 1.0 if keep else c.options[i]
        return config

    def widths(self, config: Mapping[str, float] | None = None) -> dict[str, int]:
        """The width of every choice under ``config`` (the active one by default)."""
        config = self.config if config is None else config
        missing = [c.name for c in self.choices if c.name not in config]
        if missing:
            raise KeyError(f"configuration lacks choices {missing[:4]}")
        out: dict[str, int] = {}
        for c in self.choices:  # sources come before the expand choices that read them
            out[c.name] = c.width(config, out)
        return out

    def set(self, config: Mapping[str, float]) -> None:
        """Make ``config`` the active configuration of every dynamic layer."""
        for c in self.choices:
            if config[c.name] not in c.options:
                raise ValueError(f"choice {c.name!r}: multiplier {config[c.name]} is not one of {c.options}")
        widths = self.widths(config)

        def size(x: WidthChoice | int | None) -> int:
            return x if isinstance(x, int) else widths[x.name]  # type: ignore[union-attr]

        for layer, cin, cout in self.wiring:
            if isinstance(layer, DynamicGroupedBatchNorm2d):
                layer.set_active(size(cin))
            else:
                layer.set_active(size(cin), size(cout))  # type: ignore[union-attr]
        self.config = dict(config)

    def set_min(self) -> None:
        self.set(self.min_config())

    def set_max(self) -> None:
        self.set(self.max_config())

    # ------------------------------------------------------------------------------------------ static copies
    def freeze(self) -> nn.Module:
        """A copy of the model in its active configuration with plain grouped layers of the active sizes (weights
        and running statistics copied): what :func:`groupnet.complexity` counts and :func:`groupnet.extract_branch`
        takes apart. For the minimum configuration it has the tiny zoo model's structure and state-dict keys."""
        frozen = copy.deepcopy(self.model)
        for name, m in list(frozen.named_modules()):
            if isinstance(m, dynamic_layer_types()):
                frozen.set_submodule(name, m.static())
        frozen.execution_order = "grouped"
        return frozen

    # ------------------------------------------------------------------------------------------ channel sorting
    def sortable(self) -> list[WidthChoice]:
        """The choices whose channels may be reordered: inner channels of a block (one producer chain, read by
        convs only)."""
        return [c for c in self.choices if c.producers and c.consumers]

    @torch.no_grad()
    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Reorder the inner channels of every block by descending L1 importance, per branch (each branch inside its
        own slice), and return how many channel groups were sorted.

        Importance of an inner channel is the L1 norm of the weights that read it (the consumer convs' input
        columns, NetAug's rule). The order is sorted within two segments, ``[0, tiny width)`` and ``[tiny width,
        max width)``: every configuration contains the whole first segment, so the tiny model and the full-width
        model compute the same function after sorting; augmented models of intermediate width take the most
        important extra channels first. The optimizer's per-parameter state (momentum) is permuted with the
        weights.
        """
        sorted_groups = 0
        min_widths, max_widths = self.widths(self.min_config()), self.widths(self.max_config())
        for c in self.sortable():
            k = c.consumers[0].branches
            lo, hi = min_widths[c.name], max_widths[c.name]
            importance = sum(_column_l1(m, hi) for m in c.consumers)  # (K, hi)
            if lo >= hi:
                continue
            perm = torch.cat([importance[:, :lo].argsort(dim=1, descending=True, stable=True),
                              importance[:, lo:].argsort(dim=1, descending=True, stable=True) + lo], dim=1)
            for m in c.producers:
                for p in _vectors(m):
                    _permute_rows(p, perm, k, optimizer)
            for m in c.consumers:
                _permute_columns(m.weight, perm, k, optimizer)
            sorted_groups += 1
        return sorted_groups


def _column_l1(conv: DynamicGroupedConv2d, width: int) -> Tensor:
    w = conv.weight.detach().unflatten(0, (conv.branches, conv.out_channels))  # (K, out, in, kh, kw)
    return w[:, :, :width].abs().sum(dim=(1, 3, 4))


def _vectors(m: nn.Module) -> list[Tensor]:
    names = ("weight", "bias", "running_mean", "running_var")
    return [t for t in (getattr(m, n, None) for n in names) if t is not None]


def _state_tensors(p: Tensor, optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    out = [p.data]
    if optimizer is not None and isinstance(p, nn.Parameter):
        state = optimizer.state.get(p, {})
        out += [v for v in state.values() if isinstance(v, Tensor) and v.shape == p.shape]
    return out


def _permute_rows(p: Tensor, perm: Tensor, k: int, optimizer) -> None:
    """Per branch, reorder the leading ``perm.shape[1]`` rows of a stacked ``(K*C_max, ...)`` tensor."""
    n = perm.shape[1]
    for t in _state_tensors(p, optimizer):
        v = t.unflatten(0, (k, t.shape[0] // k))
        head = v[:, :n]
        idx = perm.view(k, n, *([1] * (head.dim() - 2))).expand_as(head)
        head.copy_(head.gather(1, idx))


def _permute_columns(w: Tensor, perm: Tensor, k: int, optimizer) -> None:
    """Per branch, reorder the leading input columns of a stacked conv weight ``(K*out, in, kh, kw)``."""
    n = perm.shape[1]
    for t in _state_tensors(w, optimizer):
        v = t.unflatten(0, (k, t.shape[0] // k))  # (K, out, in, kh, kw)
        head = v[:, :, :n]
        idx = perm.view(k, 1, n, 1, 1).expand_as(head)
        head.copy_(head.gather(2, idx))


# ---------------------------------------------------------------------------------------------- construction
def widened_spec(spec: ArchSpec, width_mult: float, expand_mult: float) -> ArchSpec:
    """``spec`` at the largest augmented widths: every width times ``width_mult`` (rounded), every expansion ratio
    above 1 times ``expand_mult``."""
    def w(x: int) -> int:
        return max(1, int(round(x * width_mult)))

    changes: dict = {"stem_width": w(spec.stem_width), "widths": tuple(w(x) for x in spec.widths)}
    if spec.head_width is not None:
        changes["head_width"] = w(spec.head_width)
    if spec.expand_ratios is not None:
        changes["expand_ratios"] = tuple(t if t == 1 else t * expand_mult for t in spec.expand_ratios)
    return spec.replace(**changes)


def check_supported_spec(spec: ArchSpec) -> None:
    """Raise a ValueError when the zoo family of ``spec`` has no dynamic-width support."""
    if spec.family not in SUPPORTED_FAMILIES or spec.block == "bottleneck":
        raise ValueError(f"network augmentation has no dynamic-width support for family {spec.family!r} with "
                         f"{spec.block!r} blocks; supported: small_cnn, resnet (basic blocks), wrn, mobilenetv2")


def _check_supported(model: nn.Module) -> ArchSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(model, GroupedClassifier) or not isinstance(spec, ArchSpec):
        raise ValueError(f"network augmentation needs a zoo model (groupnet.models), got {type(model).__name__}")
    check_supported_spec(spec)
    for m in model.modules():
        if type(m) not in (GroupedConv2d, GroupedLinear, GroupedBatchNorm2d) and (
                isinstance(m, (GroupedConv2d, GroupedLinear, GroupedBatchNorm2d))):
            raise ValueError(f"network augmentation converts plain grouped layers; the model holds a "
                             f"{type(m).__name__} (build it without synchronised batch norm)")
    return spec


def make_dynamic(model: nn.Module, width_mults: Sequence[float] = DEFAULT_WIDTH_MULTS,
                 expand_mults: Sequence[float] = DEFAULT_EXPAND_MULTS) -> tuple[GroupedClassifier, WidthSpace]:
    """The augmented super-model of the zoo model ``model`` (its widths are the tiny ones) and its width space.

    The super-model is a new zoo model of the same family at the largest widths, initialised as the zoo
    initialises (drawing from the global RNG), with dynamic layers; it is active at the minimum configuration.
    ``model`` is only read (its spec, branches and layer widths), not changed.
    """
    spec = _check_supported(model)
    width_mults = check_multipliers("width multipliers", width_mults)
    expand_mults = check_multipliers("expand multipliers", expand_mults)
    ref = next(model.parameters())
    big = build_from_spec(widened_spec(spec, max(width_mults), max(expand_mults)), branches=model.branches,
                          num_classes=model.num_classes, in_channels=model.in_channels)
    big = big.to(device=ref.device, dtype=ref.dtype)
    for name, m in list(big.named_modules()):
        if type(m) in (GroupedConv2d, GroupedLinear, GroupedBatchNorm2d):
            big.set_submodule(name, to_dynamic(m))
    big.execution_order = "grouped"  # branch-major execution would run plain skeletons, not the dynamic layers
    builder = _Wiring(model, big, width_mults, expand_mults)
    space = builder.build()
    space.set_min()
    big.netaug_tiny_spec = spec  # type: ignore[attr-defined]
    return big, space


class _Wiring:
    """Walks the tiny model and the super-model side by side and records who sets which width."""

    def __init__(self, tiny: GroupedClassifier, big: GroupedClassifier, width_mults: tuple[float, ...],
                 expand_mults: tuple[float, ...]) -> None:
        self.tiny, self.big = tiny, big
        self.tiny_modules = dict(tiny.named_modules())
        self.width_mults, self.expand_mults = width_mults, expand_mults
        self.choices: list[WidthChoice] = []
        self.wiring: list[tuple[nn.Module, WidthChoice | int | None, WidthChoice | int | None]] = []
        self.names = {m: n for n, m in big.named_modules()}

    def _tiny(self, m: nn.Module) -> nn.Module:
        return self.tiny_modules[self.names[m]]

    def width_choice(self, layer: DynamicGroupedConv2d, name: str) -> WidthChoice:
        """A new width choice for ``layer``'s output, based on the tiny layer's width."""
        base = self._tiny(layer).out_channels
        c = WidthChoice(name, "width", float(base), self.width_mults)
        expected = c.width({name: max(self.width_mults)}, {})
        if expected != layer.out_channels:
            raise ValueError(f"{name}: allocated {layer.out_channels} channels, the width space expects {expected}")
        self.choices.append(c)
        return c

    def conv(self, layer: nn.Module, cin, cout) -> None:
        if not isinstance(layer, DynamicGroupedConv2d):
            raise ValueError(f"{self.names[layer]}: expected a dynamic conv, got {type(layer).__name__}")
        self.wiring.append((layer, cin, cout))

    def bn(self, layer: nn.Module, c) -> None:
        if not isinstance(layer, DynamicGroupedBatchNorm2d):
            raise ValueError(f"{self.names[layer]}: expected a dynamic batch norm, got {type(layer).__name__}")
        self.wiring.append((layer, c, None))

    def build(self) -> WidthSpace:
        big = self.big
        stem = self.width_choice(big.conv1, "conv1")
        self.conv(big.conv1, big.in_channels, stem)
        cur = self.walk(big.features, stem)
        self.wiring.append((big.head, cur, big.num_classes))
        return WidthSpace(big, self.choices, self.wiring)

    def walk(self, module: nn.Module, cur: WidthChoice) -> WidthChoice:
        for m in module.children():
            cur = self.block(m, cur)
        return cur

    def block(self, m: nn.Module, cur: WidthChoice) -> WidthChoice:
        name = self.names[m]
        if isinstance(m, nn.Sequential):
            return self.walk(m, cur)
        if isinstance(m, _PASSIVE):
            return cur
        if isinstance(m, DynamicGroupedBatchNorm2d):
            self.bn(m, cur)
            return cur
        if isinstance(m, DynamicGroupedConv2d):  # a plain conv in the feature stack (MobileNetV2's head conv)
            out = self.width_choice(m, name)
            self.conv(m, cur, out)
            return out
        if isinstance(m, ConvBNReLU):
            out = self.width_choice(m.conv, name)
            self.conv(m.conv, cur, out)
            self.bn(m.bn, out)
            return out
        if isinstance(m, BasicBlock):
            self._same_shortcut(m, "proj")
            mid = self.width_choice(m.conv1, f"{name}.mid")
            out = cur if m.proj is None else self.width_choice(m.conv2, name)
            self.conv(m.conv1, cur, mid)
            self.bn(m.bn1, mid)
            self.conv(m.conv2, mid, out)
            self.bn(m.bn2, out)
            if m.proj is not None:
                self.conv(m.proj.conv, cur, out)
                self.bn(m.proj.bn, out)
            mid.producers += [m.conv1, m.bn1]
            mid.consumers += [m.conv2]
            return out
        if isinstance(m, PreActBlock):
            self._same_shortcut(m, "shortcut")
            self.bn(m.bn1, cur)
            mid = self.width_choice(m.conv1, f"{name}.mid")
            out = cur if m.shortcut is None else self.width_choice(m.conv2, name)
            self.conv(m.conv1, cur, mid)
            self.bn(m.bn2, mid)
            self.conv(m.conv2, mid, out)
            if m.shortcut is not None:
                self.conv(m.shortcut, cur, out)
            mid.producers += [m.conv1, m.bn2]
            mid.consumers += [m.conv2]
            return out
        if isinstance(m, InvertedResidual):
            tiny = self._tiny(m)
            if m.identity != tiny.identity or (m.expand is None) != (tiny.expand is None):
                raise ValueError(f"{name}: the widened block changes its shortcut or expand conv; pick multipliers "
                                 "that keep the tiny widths distinct")
            if m.expand is None:
                mid = cur
            else:
                mid = WidthChoice(f"{name}.expand", "expand", float(tiny.expand_ratio), self.expand_mults,
                                  source=cur)
                widest = self.widths_at_max()
                if inner_width(mid.base * max(self.expand_mults), widest[cur.name]) != m.expand.out_channels:
                    raise ValueError(f"{name}: allocated {m.expand.out_channels} inner channels, the width space "
                                     "expects another width")
                self.choices.append(mid)
                self.conv(m.expand, cur, mid)
                self.bn(m.bn1, mid)
                mid.producers += [m.expand, m.bn1, m.dw, m.bn2]
                mid.consumers += [m.project]
            out = cur if m.identity else self.width_choice(m.project, name)
            self.conv(m.dw, mid, mid)
            self.bn(m.bn2, mid)
            self.conv(m.project, mid, out)
            self.bn(m.bn3, out)
            return out
        raise ValueError(f"network augmentation has no dynamic-width support for {type(m).__name__} ({name})")

    def widths_at_max(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices:
            out[c.name] = c.width({c.name: max(c.options)}, out)
        return out

    def _same_shortcut(self, m: nn.Module, attr: str) -> None:
        if (getattr(m, attr) is None) != (getattr(self._tiny(m), attr) is None):
            raise ValueError(f"{self.names[m]}: the widened block changes its shortcut; pick multipliers that keep "
                             "the tiny widths distinct")
