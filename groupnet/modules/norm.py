"""Grouped normalisation layers: per-branch statistics, running stats and affine parameters.

BatchNorm over the channel-stacked layout is already per branch (each channel has its own statistics), so the
grouped batch norms are ``nn.BatchNorm{1,2}d`` over ``K*C`` channels that know their branches: they validate the
input, and can be split into or built from K plain batch norms. They stay instances of torch's batch norm classes,
so code that looks for batch norms (weight-decay exclusion, SyncBatchNorm conversion, BN folding) finds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from groupnet import _checks
from groupnet.modules._branch_params import (
    check_branch_index,
    check_branch_modules,
    load_branch,
    split_rows,
    unbind_branches,
)
from groupnet.modules._fx import leaf_call
from groupnet.modules.branchwise import BranchSkeletonMixin


class BranchGrouping(nn.Module):
    """The child every grouped batch norm carries, naming its grouped class and its K (it holds no tensors and is
    never called).

    Why: torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` (what Lightning's ``sync_batchnorm=True`` calls)
    replaces every batch norm, grouped ones included, by a plain ``nn.SyncBatchNorm`` over the same tensors and keeps
    the replaced module's children. Through this child the converted module is still known as K branches' norms:
    :func:`groupnet.extract_branch` takes a branch out of it and :func:`groupnet.revert_sync_batchnorm` restores the
    grouped class (see :func:`grouped_norm_of`). The computation itself needs nothing: a batch norm over the
    channel-stacked layout is per branch already.
    """

    def __init__(self, grouped: type[nn.Module], branch_count: int) -> None:
        super().__init__()
        self.grouped, self.branch_count = grouped, branch_count

    def extra_repr(self) -> str:
        return f"{self.grouped.__name__}, branches={self.branch_count}"


class _GroupedBatchNormMixin(BranchSkeletonMixin):
    _plain: type[nn.modules.batchnorm._BatchNorm]
    _ranks: tuple[int, ...]

    def _init_grouped(self, num_features: int, branches: int) -> None:
        self.branches = branches
        self.branch_features = num_features
        self.grouping = BranchGrouping(_GROUPED_BASE[self._plain], branches)

    def _check(self, x: Tensor) -> None:
        name = type(self).__name__
        _checks.check_float_input(x, self.weight if self.weight is not None else self.running_mean, name)
        _checks.check_rank(x, self._ranks, name)
        _checks.check_channels(x.shape[1], self.branches, self.branch_features, name)

    def _traced_root(self, x: Tensor) -> Tensor:
        return super().forward(x)  # type: ignore[misc]

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, fx.Proxy):  # the grouped forward checks the rank itself, before torch's forward runs
            super()._check_input_dim(x)  # type: ignore[misc]

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        """The K branches' parameters and running statistics as views, named as in ``branch(k)``.

        Gradients flow back to the stacked parameters and a training-mode forward updates the stacked running
        statistics in place; ``num_batches_tracked`` is a per-branch copy (the caller counts the batch once).
        """
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(self, n) is not None]
        out = split_rows({n: getattr(self, n) for n in names}, self.branches)
        if self.num_batches_tracked is not None:
            for d in out:
                d["num_batches_tracked"] = self.num_batches_tracked.clone()
        return out

    def branch(self, k: int) -> nn.modules.batchnorm._BatchNorm:
        """A plain batch norm holding a copy of branch k's parameters and running statistics."""
        check_branch_index(k, self.branches)
        c = self.branch_features
        p = next(iter(self.parameters()), None)
        ref = p if p is not None else self.running_mean
        bn = self._plain(c, eps=self.eps, momentum=self.momentum, affine=self.affine,
                         track_running_stats=self.track_running_stats,
                         device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        load_branch(bn, self.branch_tensors()[k])
        bn.train(self.training)
        return bn

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module]):
        """Stack K plain batch norms of one configuration (parameters and running statistics copied)."""
        def config(m) -> tuple:
            counter = int(m.num_batches_tracked) if m.track_running_stats else None
            return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, counter)

        check_branch_modules(modules, cls._plain, config)
        m0 = modules[0]
        ref = m0.weight if m0.affine else m0.running_mean
        out = cls(m0.num_features, branches=len(modules), eps=m0.eps, momentum=m0.momentum, affine=m0.affine,
                  track_running_stats=m0.track_running_stats,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if m0.affine:
                out.weight.copy_(torch.cat([m.weight for m in modules]))
                out.bias.copy_(torch.cat([m.bias for m in modules]))
            if m0.track_running_stats:
                out.running_mean.copy_(torch.cat([m.running_mean for m in modules]))
                out.running_var.copy_(torch.cat([m.running_var for m in modules]))
                out.num_batches_tracked.copy_(m0.num_batches_tracked)
        out.train(m0.training)
        return out


class GroupedBatchNorm2d(_GroupedBatchNormMixin, nn.BatchNorm2d):
    """K independent ``nn.BatchNorm2d(num_features)`` on ``(N, K*num_features, H, W)``.

    ``num_features`` is per branch; torch's attribute ``self.num_features`` holds the stacked ``K*num_features``
    and ``self.branch_features`` the per-branch size.
    """

    _plain = nn.BatchNorm2d
    _ranks = (4,)

    def __init__(self, num_features: int, *, branches: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        _checks.check_positive(num_features=num_features, branches=branches)
        super().__init__(branches * num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_grouped(num_features, branches)

    def forward(self, x: Tensor) -> Tensor:
        traced = leaf_call(self, x)
        if traced is not None:
            return traced
        self._check(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.branch_features}, branches={self.branches}, eps={self.eps}, momentum={self.momentum}"


class GroupedBatchNorm1d(_GroupedBatchNormMixin, nn.BatchNorm1d):
    """K independent ``nn.BatchNorm1d(num_features)`` on ``(N, K*num_features)`` or ``(N, K*num_features, L)``."""

    _plain = nn.BatchNorm1d
    _ranks = (2, 3)

    def __init__(self, num_features: int, *, branches: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        _checks.check_positive(num_features=num_features, branches=branches)
        super().__init__(branches * num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_grouped(num_features, branches)

    def forward(self, x: Tensor) -> Tensor:
        traced = leaf_call(self, x)
        if traced is not None:
            return traced
        self._check(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.branch_features}, branches={self.branches}, eps={self.eps}, momentum={self.momentum}"


class GroupedLayerNorm(BranchSkeletonMixin, nn.Module):
    """K independent ``nn.LayerNorm(num_features)`` over the last dim of ``(..., K*num_features)``.

    ``weight`` and ``bias`` are ``(K, num_features)``.
    """

    def __init__(self, num_features: int, *, branches: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        _checks.check_positive(num_features=num_features, branches=branches)
        self.num_features, self.branches, self.eps = num_features, branches, eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(branches, num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(branches, num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Every branch as ``nn.LayerNorm.reset_parameters`` leaves it: weight 1, bias 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        traced = leaf_call(self, x)
        if traced is not None:
            return traced
        if x.dim() < 1:
            raise ValueError(f"{type(self).__name__} expects (..., K*num_features), got a scalar")
        _checks.check_channels(x.shape[-1], self.branches, self.num_features, type(self).__name__, "features")
        if self.weight is not None and _checks.autocast_dtype(x.device.type) is None:
            _checks.check_same(x, self.weight, type(self).__name__)
        return self._traced_root(x)

    def _traced_root(self, x: Tensor) -> Tensor:
        # Under autocast F.layer_norm picks the output dtype as for nn.LayerNorm (float32 on CUDA, the input's on
        # CPU); the affine step runs in the weights' dtype and returns to that one.
        y = F.layer_norm(x.unflatten(-1, (self.branches, self.num_features)), (self.num_features,), eps=self.eps)
        if self.weight is not None:
            out_dtype = y.dtype
            y = y * self.weight
            if self.bias is not None:
                y = y + self.bias
            y = y.to(out_dtype)
        return y.flatten(-2)

    def branch_tensors(self) -> list[dict[str, Tensor]]:
        """The K branches' parameters as views (autograd flows back to the stacked ones), named as in ``branch(k)``."""
        names = [n for n in ("weight", "bias") if getattr(self, n) is not None]
        return unbind_branches({n: getattr(self, n) for n in names}, self.branches)

    def branch(self, k: int) -> nn.LayerNorm:
        """A plain ``nn.LayerNorm`` holding a copy of branch k's parameters."""
        check_branch_index(k, self.branches)
        ref = self.weight
        ln = nn.LayerNorm(self.num_features, eps=self.eps, elementwise_affine=self.elementwise_affine,
                          bias=self.bias is not None, device=None if ref is None else ref.device,
                          dtype=None if ref is None else ref.dtype)
        return load_branch(ln, self.branch_tensors()[k])

    @classmethod
    def from_modules(cls, modules: Sequence[nn.LayerNorm]) -> GroupedLayerNorm:
        """Stack K ``nn.LayerNorm`` over one feature size (parameters copied)."""
        def config(m: nn.LayerNorm) -> tuple:
            return (m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None)

        check_branch_modules(modules, nn.LayerNorm, config)
        m0 = modules[0]
        if len(m0.normalized_shape) != 1:
            raise ValueError(f"GroupedLayerNorm normalises one feature dim, got normalized_shape={m0.normalized_shape}")
        ref = m0.weight
        out = cls(m0.normalized_shape[0], branches=len(modules), eps=m0.eps,
                  elementwise_affine=m0.elementwise_affine, bias=m0.bias is not None,
                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if out.weight is not None:
                out.weight.copy_(torch.stack([m.weight for m in modules]))
            if out.bias is not None:
                out.bias.copy_(torch.stack([m.bias for m in modules]))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, branches={self.branches}, eps={self.eps}, affine={self.elementwise_affine}"


_GROUPED_BASE: dict[type[nn.Module], type[nn.Module]] = {nn.BatchNorm1d: GroupedBatchNorm1d,
                                                         nn.BatchNorm2d: GroupedBatchNorm2d}


def grouped_norm_of(bn: nn.Module) -> GroupedBatchNorm1d | GroupedBatchNorm2d | None:
    """For a plain batch norm that replaced a grouped one keeping its children (torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does): the grouped batch norm it was, holding the very same parameter
    and buffer tensors (no copy), in the same training mode. None for any other module."""
    grouping = bn._modules.get("grouping")
    if (not isinstance(grouping, BranchGrouping) or not isinstance(bn, nn.modules.batchnorm._BatchNorm)
            or isinstance(bn, _GroupedBatchNormMixin)):
        return None
    k = grouping.branch_count
    if bn.num_features % k:
        raise ValueError(f"{type(bn).__name__} with {bn.num_features} features cannot be {k} branches of a "
                         f"{grouping.grouped.__name__}")
    out = grouping.grouped(bn.num_features // k, branches=k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats, device="meta")
    for name, p in bn._parameters.items():  # None entries too (affine=False)
        out.register_parameter(name, p)
    for name, b in bn._buffers.items():
        out.register_buffer(name, b, persistent=name not in bn._non_persistent_buffers_set)
    return out.train(bn.training)
