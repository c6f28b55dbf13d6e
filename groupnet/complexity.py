"""Model complexity (flops, params, acts) with pycls's conventions, for grouped and plain models.

Conventions (pycls, Dollar et al. "Fast and Accurate Model Scaling", CVPR 2021), for ONE image (batch 1):

- flops: multiply-adds (MACs, not 2*MACs) of conv and linear layers, bias adds included: a conv output element costs
  ``(C_in/groups)*kh*kw (+1 with bias)``, a linear output element ``in_features (+1 with bias)``.
- params: all parameters of the model (BN's gamma and beta included, running statistics not).
- acts: output elements of conv and linear layers.
- Norms, activations, pooling, dropout and residual adds count no flops and no acts (pycls counts max-pool outputs
  as acts; this counter does not).

The count runs the model's forward on a meta tensor (no memory, no arithmetic) with forward hooks on
``nn.Conv{1,2,3}d``, ``nn.Linear`` and the grouped layers of kind ``"conv"`` and ``"linear"`` in
:mod:`groupnet.modules.registry`, so it follows whatever the forward does (a layer called twice counts twice) and
works on any model built from these layers; ops called through ``torch.nn.functional`` directly (attention matmuls,
a conv called with a module's weight) are not seen, and transposed convs raise NotImplementedError. A grouped
model of K identical branches reports ensemble totals (all K branches) and per-branch counts = ensemble / K.

Sparse models (``masks``, e.g. ``groupnet.sparse.Masking.masks``): ``sparse_flops`` and ``sparse_params`` count only
active weights, ``sum over layers of density_l x dense count_l`` (each weight's MACs scale by its active fraction;
bias adds, norms and every unmasked parameter count in full); acts are unchanged by unstructured sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from groupnet.modules.registry import grouped_types, is_grouped_layer

CONVENTIONS = (
    "flops = multiply-adds (MACs) of conv and linear layers incl. bias adds, for one image; params = all "
    "parameters; acts = output elements of conv and linear layers; norms, activations, pooling and residual adds "
    "count nothing (pycls conventions)"
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *grouped_types("conv"))
_LINEAR_TYPES = (nn.Linear, *grouped_types("linear"))


@dataclass(frozen=True)
class LayerCount:
    """One conv or linear call: its flops (MACs) and acts for one image, and its own parameters."""

    name: str
    kind: str
    flops: int
    params: int
    acts: int
    #: flops and params counting active weights only (equal to the dense ones without a mask).
    sparse_flops: int | None = None
    sparse_params: int | None = None


@dataclass(frozen=True)
class Complexity:
    """flops (MACs), params and acts of a model for one input image: ensemble totals over its K branches.

    For a grouped model of K identical branches, each branch costs exactly ``total / K`` (:attr:`per_branch`).
    """

    flops: int
    params: int
    acts: int
    branches: int
    input_size: tuple[int, ...]
    layers: tuple[LayerCount, ...] = ()
    model_name: str = ""
    #: Counting active weights only, when masks were given (None otherwise).
    sparse_flops: int | None = None
    sparse_params: int | None = None

    @property
    def per_branch(self) -> dict[str, float]:
        """flops, params and acts of one branch (ensemble / K), and the sparse counts when masks were given."""
        k = self.branches
        names = ("flops", "params", "acts") + (("sparse_flops", "sparse_params") if self.sparse_flops is not None
                                               else ())
        return {name: _div(getattr(self, name), k) for name in names}

    def as_dict(self) -> dict[str, float]:
        """Ensemble and per-branch counts as one flat dict (for CSV rows)."""
        out: dict[str, float] = {"flops": self.flops, "params": self.params, "acts": self.acts,
                                 "branches": self.branches}
        if self.sparse_flops is not None and self.sparse_params is not None:
            out.update({"sparse_flops": self.sparse_flops, "sparse_params": self.sparse_params})
        out.update({f"{k}_per_branch": v for k, v in self.per_branch.items()})
        return out

    def table(self, per_layer: bool = False) -> str:
        """A text table: per-branch and ensemble counts (and every conv/linear call with ``per_layer``)."""
        head = f"{self.model_name or 'model'} at input {self.input_size} per branch, K={self.branches}"
        pb = self.per_branch
        rows = [("per branch", pb["flops"], pb["params"], pb["acts"]),
                (f"ensemble (K={self.branches})", self.flops, self.params, self.acts)]
        if self.sparse_flops is not None and self.sparse_params is not None:
            rows += [("per branch, active weights", pb["sparse_flops"], pb["sparse_params"], pb["acts"]),
                     (f"ensemble (K={self.branches}), active weights", self.sparse_flops, self.sparse_params,
                      self.acts)]
        width = max(len(r[0]) for r in rows)
        lines = [head, f"{'':{width}}  {'flops (MACs)':>16}  {'params':>14}  {'acts':>14}"]
        for name, f, p, a in rows:
            lines.append(f"{name:{width}}  {_fmt(f):>16}  {_fmt(p):>14}  {_fmt(a):>14}")
        if per_layer and self.layers:
            lw = max(len(layer.name) for layer in self.layers)
            lines.append("")
            lines.append(f"{'layer':{lw}}  {'type':16}  {'flops (MACs)':>16}  {'params':>12}  {'acts':>12}")
            for layer in self.layers:
                lines.append(f"{layer.name:{lw}}  {layer.kind:16}  {layer.flops:>16,}  {layer.params:>12,}  "
                             f"{layer.acts:>12,}")
        lines.append(f"Conventions: {CONVENTIONS}.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def model_branches(model: nn.Module) -> int:
    """K of a model: its int attribute ``branches``, else that of its grouped layers, else 1 (a plain model)."""
    k = getattr(model, "branches", None)
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    ks = {m.branches for m in model.modules() if is_grouped_layer(m)}
    if len(ks) > 1:
        raise ValueError(f"{type(model).__name__} mixes grouped layers with different branch counts {sorted(ks)}")
    return ks.pop() if ks else 1


def complexity(model: nn.Module, input_size: Sequence[int], *, branches: int | None = None,
               masks: Mapping[str, Tensor] | None = None) -> Complexity:
    """Count flops (MACs), params and acts of ``model`` for one image, without running real compute.

    Args:
        model: a grouped model (K branches; its input is ``(1, K*C, H, W)``) or a plain torch model (K=1). Real or
            meta parameters; the model is not changed (train/eval flags are restored, buffers untouched).
        input_size: ``(C, H, W)`` of one branch's view (or ``(F,)`` for a model on features).
        branches: K, when it cannot be read from the model (see :func:`model_branches`).
        masks: ``{parameter name: mask of the weight's shape}`` (non-zero = active) of a sparse model: the result
            then also holds ``sparse_flops`` and ``sparse_params`` (active weights only).

    Returns:
        :class:`Complexity` with ensemble totals; ``.per_branch`` gives one branch (= total / K). The conventions
        (pycls's) are in the module docstring and printed with every table.
    """
    size = tuple(int(s) for s in input_size)
    if not size or any(s < 1 for s in size):
        raise ValueError(f"input_size must be positive sizes (C, H, W) of one branch's view, got {input_size!r}")
    k = model_branches(model) if branches is None else branches
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"branches must be a positive int, got {k!r}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.empty(1, k * size[0], *size[1:], device="meta", dtype=dtype)

    names = {m: n or type(model).__name__ for n, m in model.named_modules()}
    paths = {m: n for n, m in model.named_modules()}
    active = _active_counts(model, masks)
    layers: list[LayerCount] = []

    def hook(module: nn.Module, inputs, output: Tensor) -> None:
        w = module.weight
        per_out = (w.shape[-1] if isinstance(module, _LINEAR_TYPES) else math.prod(w.shape[1:]))
        bias = module.bias is not None
        n = output.numel()
        own = sum(p.numel() for p in module.parameters(recurse=False))
        weight_flops = n * per_out  # = w.numel() x output positions
        sparse_flops = sparse_params = None
        if active is not None:
            nnz = active.get(f"{paths[module]}.weight" if paths[module] else "weight", w.numel())
            sparse_flops = weight_flops // w.numel() * nnz + n * bias
            sparse_params = own - w.numel() + nnz
        layers.append(LayerCount(names[module], type(module).__name__, n * (per_out + bias), own, n,
                                 sparse_flops, sparse_params))

    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise NotImplementedError(f"complexity does not count transposed convs ({names[m]}: {type(m).__name__})")
    counted = [m for m in model.modules() if isinstance(m, _CONV_TYPES + _LINEAR_TYPES)]
    handles = [m.register_forward_hook(hook) for m in counted]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _meta_forward(model, x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    params = sum(p.numel() for p in model.parameters())
    sparse_flops = sparse_params = None
    if active is not None:
        sparse_flops = sum(int(layer.sparse_flops or 0) for layer in layers)
        named = dict(model.named_parameters())
        sparse_params = params - sum(named[n].numel() - c for n, c in active.items())
    return Complexity(
        flops=sum(layer.flops for layer in layers),
        params=params,
        acts=sum(layer.acts for layer in layers),
        branches=k,
        input_size=size,
        layers=tuple(layers),
        model_name=type(model).__name__,
        sparse_flops=sparse_flops,
        sparse_params=sparse_params,
    )


def _active_counts(model: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, int] | None:
    """Active entries of each masked parameter, checked against the model's parameters."""
    if masks is None:
        return None
    named = dict(model.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in named:
            raise ValueError(f"masks: {name!r} is not a parameter of {type(model).__name__}")
        if tuple(mask.shape) != tuple(named[name].shape):
            raise ValueError(f"masks: {name} has shape {tuple(mask.shape)}, the parameter {tuple(named[name].shape)}")
        out[name] = int((mask != 0).sum())
    return out


def _meta_forward(model: nn.Module, x: Tensor) -> None:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    if all(t.is_meta for t in tensors.values()):
        model(x)
        return
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    functional_call(model, meta, (x,), tie_weights=True, strict=False)


def _div(total: int, k: int) -> float:
    return total // k if total % k == 0 else total / k


def _fmt(v: float) -> str:
    return f"{v:,}" if float(v).is_integer() else f"{v:,.1f}"
