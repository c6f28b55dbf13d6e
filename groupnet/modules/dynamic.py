"""Dynamic-width grouped layers: allocated at a maximum width, run on a leading slice of every branch's weights.

A dynamic layer is its grouped layer (a subclass, sharing its layout and parameters) with an *active* size per
dimension: a conv or linear reads ``weight[k][:out_active, :in_active]`` of each branch k, a batch norm the leading
``active`` entries of each branch's affine parameters and running statistics. All K branches run the same active
sizes, so the op stays one rectangular grouped op. At full width the layer is exactly its grouped parent (the same
code path, no slicing). These are the layers of network augmentation (:mod:`groupnet.netaug`): the tiny model is the
minimum slice of every layer, wider sub-models share its weights.

What the slices cost:

- linear: the grouped GEMM (torch ``baddbmm`` and the Triton kernel) reads ``weight[:, :out, :in]`` through its
  strides; nothing is copied.
- conv: the grouped conv takes the weight as ``(K*out, in/groups, kh, kw)``. Branch k's active rows start at
  ``k*out_max``, which no 4-d stride expresses when ``out < out_max``, so a narrower-than-allocated slice is copied
  once per forward (``reshape``) and its gradient scattered back by autograd. Both backends pay that copy; it is
  the size of the active weights (``benchmarks/NOTES.md`` measures it).
- batch norm: the affine slices are copied (a few hundred floats); running statistics are updated in place through
  views of the stacked buffers.

``branch(k)`` returns the plain torch layer of the active slice, so :func:`groupnet.extract_branch` of a dynamic
model is the plain model of its active configuration.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groupnet.modules._branch_params import check_branch_index, load_branch
from groupnet.modules.conv import GroupedConv2d
from groupnet.modules.linear import GroupedLinear
from groupnet.modules.norm import GroupedBatchNorm2d
from groupnet.ops import grouped_conv2d, grouped_linear

__all__ = ["DynamicGroupedBatchNorm2d", "DynamicGroupedConv2d", "DynamicGroupedLinear", "dynamic_layer_types",
           "to_dynamic"]


def _check_active(name: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"{name} must be an int in [1, {maximum}] (the allocated width), got {value!r}")
    return value


def _sharing(cls: type[nn.Module], layer: nn.Module) -> Any:
    """An instance of the dynamic subclass ``cls`` holding ``layer``'s own parameters, buffers and submodules (no
    copy: the two modules hold the same tensors), active at full width."""
    out = cls.__new__(cls)
    out.__dict__.update(layer.__dict__)
    out._parameters = dict(layer._parameters)
    out._buffers = dict(layer._buffers)
    out._modules = dict(layer._modules)
    out._init_dynamic()
    return out


class DynamicGroupedConv2d(GroupedConv2d):
    """A :class:`GroupedConv2d` allocated at ``(in_channels, out_channels)`` per branch that runs
    ``active_in -> active_out`` channels (leading slices). A depthwise conv (``groups == in_channels ==
    out_channels``) keeps ``groups == active_in == active_out``. Other inner groups (ResNeXt) are not supported.
    """

    @property
    def depthwise(self) -> bool:
        return self.groups > 1

    def _init_dynamic(self) -> None:
        if self.groups != 1 and not (self.groups == self.in_channels == self.out_channels):
            raise ValueError(f"a dynamic-width conv must be dense (groups=1) or depthwise (groups == in_channels == "
                             f"out_channels), got groups={self.groups} with {self.in_channels} -> {self.out_channels}")
        self.active_in, self.active_out = self.in_channels, self.out_channels

    @classmethod
    def from_grouped(cls, conv: GroupedConv2d) -> DynamicGroupedConv2d:
        """A dynamic conv sharing ``conv``'s parameters (no copy), active at full width."""
        return _sharing(cls, conv)

    def set_active(self, in_channels: int, out_channels: int) -> None:
        """Run ``in_channels -> out_channels`` per branch (equal for a depthwise conv)."""
        _check_active("active in_channels", in_channels, self.in_channels)
        _check_active("active out_channels", out_channels, self.out_channels)
        if self.depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise conv keeps in == out channels, got {in_channels} -> {out_channels}")
        self.active_in, self.active_out = in_channels, out_channels

    @property
    def is_full(self) -> bool:
        return self.active_in == self.in_channels and self.active_out == self.out_channels

    def active_groups(self) -> int:
        return self.active_in if self.depthwise else 1

    def active_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The active weight ``(K*active_out, active_in/groups, kh, kw)`` and bias, as the grouped conv takes them
        (views at full width; a narrower slice is copied, see the module docstring)."""
        if self.is_full:
            return self.weight, self.bias
        k, co = self.branches, self.active_out
        cin = 1 if self.depthwise else self.active_in
        w = self.weight.unflatten(0, (k, self.out_channels))[:, :co, :cin].reshape(k * co, cin, *self.kernel_size)
        b = None if self.bias is None else self.bias.view(k, self.out_channels)[:, :co].reshape(k * co)
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        if self.is_full:
            return super().forward(x)
        if x.dim() != 4 or x.shape[1] != self.branches * self.active_in:
            raise ValueError(f"{type(self).__name__} is active at {self.active_in} input channels per branch: "
                             f"expected (N, {self.branches * self.active_in}, H, W), got {tuple(x.shape)}")
        w, b = self.active_parameters()
        return grouped_conv2d(x, w, b, branches=self.branches, stride=self.stride, padding=self.padding,
                              dilation=self.dilation, groups=self.active_groups())

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        """Each branch's active weight (and bias) as views of the stacked parameters."""
        co, cin = self.active_out, (1 if self.depthwise else self.active_in)
        w = self.weight.unflatten(0, (self.branches, self.out_channels))
        out = []
        for k in range(self.branches):
            d = {"weight": w[k, :co, :cin]}
            if self.bias is not None:
                d["bias"] = self.bias.view(self.branches, self.out_channels)[k, :co]
            out.append(d)
        return out

    def branch(self, k: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` of the active sizes holding a copy of branch k's active weights."""
        check_branch_index(k, self.branches)
        conv = nn.Conv2d(self.active_in, self.active_out, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.active_groups(), bias=self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        return load_branch(conv, {n: t.contiguous() for n, t in self.branch_tensors()[k].items()})

    def static(self) -> GroupedConv2d:
        """A plain :class:`GroupedConv2d` of the active sizes holding a copy of the active weights."""
        w, b = self.active_parameters()
        conv = GroupedConv2d(self.active_in, self.active_out, self.kernel_size, branches=self.branches,
                             stride=self.stride, padding=self.padding, dilation=self.dilation,
                             groups=self.active_groups(), bias=b is not None, device="meta", dtype=w.dtype)
        conv.weight = nn.Parameter(w.detach().clone())
        conv.bias = None if b is None else nn.Parameter(b.detach().clone())
        return conv

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active={self.active_in}->{self.active_out}"


class DynamicGroupedLinear(GroupedLinear):
    """A :class:`GroupedLinear` allocated at ``(in_features, out_features)`` per branch that runs
    ``active_in -> active_out`` features; the grouped GEMM reads the slice through strides (no copy)."""

    def _init_dynamic(self) -> None:
        self.active_in, self.active_out = self.in_features, self.out_features

    @classmethod
    def from_grouped(cls, linear: GroupedLinear) -> DynamicGroupedLinear:
        """A dynamic linear sharing ``linear``'s parameters (no copy), active at full width."""
        return _sharing(cls, linear)

    def set_active(self, in_features: int, out_features: int) -> None:
        _check_active("active in_features", in_features, self.in_features)
        _check_active("active out_features", out_features, self.out_features)
        self.active_in, self.active_out = in_features, out_features

    @property
    def is_full(self) -> bool:
        return self.active_in == self.in_features and self.active_out == self.out_features

    def active_parameters(self) -> tuple[Tensor, Tensor | None]:
        """The active ``(K, active_out, active_in)`` weight and ``(K, active_out)`` bias, as strided views."""
        o, i = self.active_out, self.active_in
        return self.weight[:, :o, :i], None if self.bias is None else self.bias[:, :o]

    def forward(self, x: Tensor) -> Tensor:
        if self.is_full:
            return super().forward(x)
        w, b = self.active_parameters()
        return grouped_linear(x, w, b)

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        w, b = self.active_parameters()
        return [{"weight": w[k]} | ({} if b is None else {"bias": b[k]}) for k in range(self.branches)]

    def branch(self, k: int) -> nn.Linear:
        check_branch_index(k, self.branches)
        lin = nn.Linear(self.active_in, self.active_out, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        return load_branch(lin, {n: t.contiguous() for n, t in self.branch_tensors()[k].items()})

    def static(self) -> GroupedLinear:
        w, b = self.active_parameters()
        lin = GroupedLinear(self.active_in, self.active_out, branches=self.branches, bias=b is not None,
                            device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().clone())
        lin.bias = None if b is None else nn.Parameter(b.detach().clone())
        return lin

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active={self.active_in}->{self.active_out}"


class DynamicGroupedBatchNorm2d(GroupedBatchNorm2d):
    """A :class:`GroupedBatchNorm2d` allocated at ``branch_features`` per branch that normalises the leading
    ``active`` channels of each branch with the leading slices of its parameters and running statistics."""

    def _init_dynamic(self) -> None:
        self.active = self.branch_features

    @classmethod
    def from_grouped(cls, bn: GroupedBatchNorm2d) -> DynamicGroupedBatchNorm2d:
        """A dynamic batch norm sharing ``bn``'s parameters and buffers (no copy), active at full width."""
        if type(bn) is not GroupedBatchNorm2d:
            raise TypeError(f"DynamicGroupedBatchNorm2d converts a GroupedBatchNorm2d, got {type(bn).__name__} "
                            "(convert synchronised batch norms back first)")
        if not bn.track_running_stats:
            raise ValueError("DynamicGroupedBatchNorm2d needs track_running_stats=True")
        return _sharing(cls, bn)

    def set_active(self, features: int) -> None:
        self.active = _check_active("active num_features", features, self.branch_features)

    @property
    def is_full(self) -> bool:
        return self.active == self.branch_features

    def _slice(self, t: Tensor) -> Tensor:
        """Each branch's leading ``active`` entries of a stacked ``(K*C_max,)`` tensor, as a ``(K, active)`` view."""
        return t.view(self.branches, self.branch_features)[:, : self.active]

    def forward(self, x: Tensor) -> Tensor:
        if self.is_full:
            return super().forward(x)
        k, c = self.branches, self.active
        if x.dim() != 4 or x.shape[1] != k * c:
            raise ValueError(f"{type(self).__name__} is active at {c} channels per branch: expected "
                             f"(N, {k * c}, H, W), got {tuple(x.shape)}")
        # torch's _BatchNorm.forward, on the slices: same momentum rule and num_batches_tracked count.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean = self._slice(self.running_mean).reshape(k * c).clone()  # clone: at K=1 the reshape is a view
        var = self._slice(self.running_var).reshape(k * c).clone()
        weight = None if self.weight is None else self._slice(self.weight).reshape(k * c)
        bias = None if self.bias is None else self._slice(self.bias).reshape(k * c)
        y = F.batch_norm(x, mean, var, weight, bias, self.training, factor, self.eps)
        if self.training:
            with torch.no_grad():  # F.batch_norm updated the copies; write them back into the stacked buffers
                self._slice(self.running_mean).copy_(mean.view(k, c))
                self._slice(self.running_var).copy_(var.view(k, c))
        return y

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(self, n) is not None]
        sliced = {n: self._slice(getattr(self, n)) for n in names}
        out = [{n: t[k] for n, t in sliced.items()} for k in range(self.branches)]
        for d in out:
            d["num_batches_tracked"] = self.num_batches_tracked.clone()
        return out

    def branch(self, k: int) -> nn.BatchNorm2d:
        check_branch_index(k, self.branches)
        ref = self.running_mean
        bn = nn.BatchNorm2d(self.active, eps=self.eps, momentum=self.momentum, affine=self.affine,
                            device=ref.device, dtype=ref.dtype)
        load_branch(bn, {n: t.contiguous() for n, t in self.branch_tensors()[k].items()})
        bn.train(self.training)
        return bn

    def static(self) -> GroupedBatchNorm2d:
        ref = self.running_mean
        bn = GroupedBatchNorm2d(self.active, branches=self.branches, eps=self.eps, momentum=self.momentum,
                                affine=self.affine, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for n in ("weight", "bias", "running_mean", "running_var"):
                if getattr(self, n) is not None:
                    getattr(bn, n).copy_(self._slice(getattr(self, n)).reshape(-1))
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active={self.active}"


_CONVERSIONS: dict[type, type] = {
    GroupedConv2d: DynamicGroupedConv2d,
    GroupedLinear: DynamicGroupedLinear,
    GroupedBatchNorm2d: DynamicGroupedBatchNorm2d,
}


def dynamic_layer_types() -> tuple[type[nn.Module], ...]:
    """The dynamic-width layer classes."""
    return tuple(_CONVERSIONS.values())


def to_dynamic(layer: nn.Module) -> nn.Module:
    """The dynamic-width version of a grouped conv, linear or batch norm, sharing its parameters."""
    cls = _CONVERSIONS.get(type(layer))
    if cls is None:
        raise TypeError(f"no dynamic-width version of {type(layer).__name__}; dynamic layers exist for "
                        f"{sorted(t.__name__ for t in _CONVERSIONS)}")
    return cls.from_grouped(layer)
