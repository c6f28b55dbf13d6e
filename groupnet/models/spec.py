"""ArchSpec: the explicit per-branch configuration every model of the zoo is built from.

An arch name (``"wrn-28-10"``) names an unsplit network; :mod:`groupnet.models.registry` turns it into an
``ArchSpec``, :mod:`groupnet.models.divide` divides it into K branches, and the family's class builds it. Scaling
(:mod:`groupnet.scaling`) edits the same fields, so every size is explicit here: nothing is derived later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BLOCKS = ("plain", "basic", "bottleneck", "preact", "inverted")


@dataclass(frozen=True)
class ArchSpec:
    """Sizes of ONE branch of a CIFAR-style network (the grouped model holds K such branches).

    Attributes:
        family: the zoo family that builds it (``"small_cnn"``, ``"resnet"``, ``"resnext"``, ``"wrn"``,
            ``"mobilenetv2"``).
        block: ``"plain"`` (conv-BN-ReLU), ``"basic"`` (ResNet basic block, post-activation),
            ``"bottleneck"`` (1x1-3x3-1x1, post-activation, 3x3 grouped by ``groups``), ``"preact"`` (WRN) or
            ``"inverted"`` (MobileNetV2's inverted bottleneck: 1x1 expand, 3x3 depthwise, 1x1 linear projection).
        depths: blocks per stage.
        widths: output channels of each stage.
        stem_width: output channels of the first conv.
        strides: stride of each stage (``plain`` stages downsample by max-pool, the others by a strided conv).
        mid_widths: inner width of each stage's bottleneck blocks (``bottleneck`` only).
        groups: cardinality of the bottleneck's 3x3 conv (ResNeXt); 1 otherwise.
        drop_rate: dropout before the classifier.
        block_drop_rate: dropout between the two convs of a ``preact`` block (WRN's dropout).
        zero_init_residual: zero-init the gamma of the last BN of each residual block (``basic``/``bottleneck``).
        expand_ratios: expansion ratio of each stage's inverted bottlenecks (``inverted`` only): the inner width
            is ``round(ratio * input width)``; 1 means no expand conv.
        head_width: output channels of the 1x1 conv before the global pool (``inverted`` only).
    """

    family: str
    block: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    strides: tuple[int, ...]
    mid_widths: tuple[int, ...] | None = None
    groups: int = 1
    drop_rate: float = 0.0
    block_drop_rate: float = 0.0
    zero_init_residual: bool = True
    # inverted bottlenecks (MobileNetV2) only
    expand_ratios: tuple[float, ...] | None = None
    head_width: int | None = None

    def __post_init__(self) -> None:
        for name in ("depths", "widths", "strides", "mid_widths", "expand_ratios"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.block not in BLOCKS:
            raise ValueError(f"ArchSpec.block must be one of {BLOCKS}, got {self.block!r}")
        n = len(self.depths)
        if n == 0 or len(self.widths) != n or len(self.strides) != n:
            raise ValueError(
                f"ArchSpec needs one depth, width and stride per stage, got depths={self.depths}, "
                f"widths={self.widths}, strides={self.strides}"
            )
        ints = {"stem_width": self.stem_width, "groups": self.groups}
        ints.update({f"depths[{i}]": d for i, d in enumerate(self.depths)})
        ints.update({f"widths[{i}]": w for i, w in enumerate(self.widths)})
        ints.update({f"strides[{i}]": s for i, s in enumerate(self.strides)})
        for name, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ArchSpec.{name} must be a positive int, got {v!r}")
        if self.block == "bottleneck":
            if self.mid_widths is None or len(self.mid_widths) != n:
                raise ValueError(f"a bottleneck ArchSpec needs {n} mid_widths, got {self.mid_widths}")
            for i, m in enumerate(self.mid_widths):
                if isinstance(m, bool) or not isinstance(m, int) or m < 1 or m % self.groups:
                    raise ValueError(
                        f"ArchSpec.mid_widths[{i}] must be a positive multiple of groups={self.groups}, got {m!r}"
                    )
        elif self.mid_widths is not None or self.groups != 1:
            raise ValueError(f"mid_widths and groups apply to bottleneck blocks only, block is {self.block!r}")
        if self.block == "inverted":
            if self.expand_ratios is None or len(self.expand_ratios) != n:
                raise ValueError(f"an inverted-bottleneck ArchSpec needs {n} expand_ratios, got {self.expand_ratios}")
            for i, r in enumerate(self.expand_ratios):
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 1:
                    raise ValueError(f"ArchSpec.expand_ratios[{i}] must be a number >= 1, got {r!r}")
            h = self.head_width
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                raise ValueError(f"ArchSpec.head_width must be a positive int for inverted bottlenecks, got {h!r}")
        elif self.expand_ratios is not None or self.head_width is not None:
            raise ValueError(f"expand_ratios and head_width apply to inverted bottlenecks only, block is {self.block!r}")
        for name in ("drop_rate", "block_drop_rate"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"ArchSpec.{name} must be in [0, 1), got {p!r}")

    def replace(self, **changes) -> ArchSpec:
        """A copy with some fields changed; unknown names raise a TypeError listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)} - {"family", "block"}
        unknown = set(changes) - valid
        if unknown:
            raise TypeError(f"unknown model override(s) {sorted(unknown)}; valid overrides are {sorted(valid)}")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A one-line summary, e.g. ``d=9,9,9 w=16,32,64 stem=16``."""
        s = f"d={_join(self.depths)} w={_join(self.widths)} stem={self.stem_width}"
        if self.mid_widths is not None:
            s += f" mid={_join(self.mid_widths)}"
        if self.groups != 1:
            s += f" g={self.groups}"
        if self.expand_ratios is not None:
            s += f" t={_join(self.expand_ratios)} head={self.head_width}"
        return s


def _join(values: tuple[float, ...]) -> str:
    return ",".join(str(v) if isinstance(v, int) else f"{v:g}" for v in values)
