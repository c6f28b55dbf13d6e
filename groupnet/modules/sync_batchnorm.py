"""Batch norm whose training statistics are those of the global batch, over all processes of a data-parallel run.

Why: with per-process statistics, W processes with batch B/W normalise differently from one process with batch B,
so a data-parallel run would not reproduce a single-process run. ``nn.SyncBatchNorm`` refuses CPU tensors (gloo);
these classes run on any backend. Their training forward all-reduces the per-channel sum (with the sample count),
then the per-channel squared deviation from the global mean, with torch's differentiable functional all-reduce
(``torch.distributed._functional_collectives.all_reduce``, whose backward all-reduces the gradient), so the
gradients are those of the global batch too. In eval mode, or outside a multi-process group, each class is exactly
the batch norm it subclasses.

The classes subclass the batch norm they synchronise, so every ``isinstance`` check still holds (a
:class:`SyncGroupedBatchNorm2d` is a :class:`~groupnet.GroupedBatchNorm2d` and an ``nn.BatchNorm2d``):
:class:`SyncBatchNorm1d`/``2d``/``3d`` for torch's batch norms and :class:`SyncGroupedBatchNorm1d`/``2d`` for the
grouped ones. A grouped one's ``branch(k)`` is a plain torch batch norm (a copy of one branch is a model of its
own); its ``branch_skeleton()`` is the synchronised plain one, so branch-major execution keeps the synchronisation.

:func:`convert_sync_batchnorm` and :func:`revert_sync_batchnorm` replace the modules: each new module holds the very
same parameter and buffer tensors as the one it replaces, so ``state_dict`` keys and values, and an optimizer built
before or after, are unaffected.

torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``) turns a grouped batch
norm into a plain ``nn.SyncBatchNorm`` over the same ``K*C`` channels. That computes the same thing (batch norm over
the channel-stacked layout is per branch), on the devices torch's class supports (CUDA, not gloo on CPU), and the
module keeps the grouped one's :class:`~groupnet.modules.norm.BranchGrouping` child, so
:func:`groupnet.extract_branch` still takes branches out of it and :func:`revert_sync_batchnorm` restores the grouped
class; :func:`convert_sync_batchnorm` turns it into the synchronised grouped class (which runs on any backend).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from groupnet.modules.norm import GroupedBatchNorm1d, GroupedBatchNorm2d, grouped_norm_of


def world_is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: Tensor, group: str | None = None) -> Tensor:
    from torch.distributed import _functional_collectives as funcol  # torch's recommended differentiable collective

    return funcol.all_reduce(t, "sum", dist.group.WORLD if group is None else group)


class _GlobalBatchStatistics:
    """The training forward of the synchronised classes; the class it is mixed into supplies everything else."""

    #: The processes that share the statistics, as (process group name, its size); None: all processes. A name,
    #: not the group object, so that the module can still be deep-copied (process groups cannot be pickled).
    sync_group: tuple[str, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self._synchronised()):
            return super().forward(x)  # type: ignore[misc]
        self._check_global_input(x)
        return _global_batch_norm(self, x)

    def _synchronised(self) -> bool:
        if self.sync_group is None:
            return world_is_distributed()
        return dist.is_available() and dist.is_initialized() and self.sync_group[1] > 1

    def _check_global_input(self, x: Tensor) -> None:
        self._check_input_dim(x)  # type: ignore[attr-defined]


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Batch norm of ``x`` with the statistics of the global batch; updates ``bn``'s running statistics."""
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = [1, c] + [1] * (x.dim() - 2)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    group = None if bn.sync_group is None else bn.sync_group[0]  # type: ignore[attr-defined]
    local_count = xf.new_full((1,), x.numel() // c)
    sums = _all_reduce_sum(torch.cat([xf.sum(dims), local_count]), group)
    count = sums[c]
    mean = sums[:c] / count
    centred = xf - mean.view(shape)
    var = _all_reduce_sum(centred.square().sum(dims), group) / count
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.view(shape)
    if bn.bias is not None:
        y = y + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * (count / (count - 1).clamp(min=1))
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), m)
    return y.to(x.dtype)


class SyncBatchNorm1d(_GlobalBatchStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with global-batch training statistics (see the module docstring)."""


class SyncBatchNorm2d(_GlobalBatchStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global-batch training statistics (see the module docstring)."""


class SyncBatchNorm3d(_GlobalBatchStatistics, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with global-batch training statistics (see the module docstring)."""


class _GlobalBatchStatisticsGrouped(_GlobalBatchStatistics):
    """What the synchronised grouped batch norms add: the grouped input check and a synchronised branch skeleton."""

    _sync_plain: type[nn.Module]

    def _check_global_input(self, x: Tensor) -> None:
        self._check(x)  # type: ignore[attr-defined]

    def branch_skeleton(self) -> nn.Module:
        """The synchronised plain batch norm on the meta device: one branch, synchronised as this layer is."""
        skeleton = _holding_same_tensors(super().branch_skeleton(), self._sync_plain)  # type: ignore[misc]
        skeleton.sync_group = self.sync_group
        return skeleton


class SyncGroupedBatchNorm1d(_GlobalBatchStatisticsGrouped, GroupedBatchNorm1d):
    """:class:`~groupnet.GroupedBatchNorm1d` with global-batch training statistics (see the module docstring)."""

    _sync_plain = SyncBatchNorm1d


class SyncGroupedBatchNorm2d(_GlobalBatchStatisticsGrouped, GroupedBatchNorm2d):
    """:class:`~groupnet.GroupedBatchNorm2d` with global-batch training statistics (see the module docstring)."""

    _sync_plain = SyncBatchNorm2d


SYNC_CLASS_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: SyncBatchNorm1d,
    nn.BatchNorm2d: SyncBatchNorm2d,
    nn.BatchNorm3d: SyncBatchNorm3d,
    GroupedBatchNorm1d: SyncGroupedBatchNorm1d,
    GroupedBatchNorm2d: SyncGroupedBatchNorm2d,
}
_UNSYNCED_CLASS_OF = {sync: plain for plain, sync in SYNC_CLASS_OF.items()}


def _refuse_hooks(bn: nn.Module) -> None:
    hooks = (bn._forward_hooks, bn._forward_pre_hooks, bn._backward_hooks, bn._backward_pre_hooks)
    if any(hooks):
        raise ValueError(f"cannot replace a {type(bn).__name__} that has hooks (they would stay on the replaced "
                         "module); register them after the conversion")


def _holding_same_tensors(bn: nn.modules.batchnorm._BatchNorm, cls: type) -> nn.Module:
    """A ``cls`` configured as ``bn`` whose parameters and buffers are ``bn``'s own tensor objects (no copy)."""
    _refuse_hooks(bn)
    config = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
              "track_running_stats": bn.track_running_stats, "device": "meta"}
    if isinstance(bn, (GroupedBatchNorm1d, GroupedBatchNorm2d)):
        new = cls(bn.branch_features, branches=bn.branches, **config)
    else:
        new = cls(bn.num_features, **config)
    for name, p in bn._parameters.items():  # None entries too (affine=False, or torch's bias=False)
        new.register_parameter(name, p)
    for name, b in bn._buffers.items():
        new.register_buffer(name, b, persistent=name not in bn._non_persistent_buffers_set)
    return new.train(bn.training)


def _replace(model: nn.Module, make) -> nn.Module:
    """Replace every module ``m`` of ``model`` for which ``make(m)`` gives a new module; a module reached by several
    paths is replaced by one new module."""
    new: dict[nn.Module, nn.Module] = {}

    def replaced(m: nn.Module) -> nn.Module:
        if m not in new:
            made = make(m)
            new[m] = m if made is None else made
        return new[m]

    root = replaced(model)
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):  # every slot: named_children skips a repeated module
            if child is not None and replaced(child) is not child:
                setattr(parent, name, new[child])
    return root


def _synchronised(m: nn.Module) -> nn.Module | None:
    grouped = grouped_norm_of(m)
    if grouped is not None:  # torch's nn.SyncBatchNorm made from a grouped batch norm: synchronised as grouped
        _refuse_hooks(m)
        return _holding_same_tensors(grouped, SYNC_CLASS_OF[type(grouped)])
    cls = _sync_class(m)
    return None if cls is None else _holding_same_tensors(m, cls)


def _unsynchronised(m: nn.Module) -> nn.Module | None:
    grouped = grouped_norm_of(m)
    if grouped is not None:  # torch's nn.SyncBatchNorm made from a grouped batch norm
        _refuse_hooks(m)
        return grouped
    cls = _UNSYNCED_CLASS_OF.get(type(m))
    return None if cls is None else _holding_same_tensors(m, cls)


def _sync_class(m: nn.Module) -> type | None:
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None
    if isinstance(m, (nn.SyncBatchNorm, _GlobalBatchStatistics)):
        return None  # synchronised already
    if type(m) not in SYNC_CLASS_OF:
        raise TypeError(f"convert_sync_batchnorm: no synchronised counterpart for {type(m).__name__} "
                        f"(known: {', '.join(t.__name__ for t in SYNC_CLASS_OF)})")
    return SYNC_CLASS_OF[type(m)]


def convert_sync_batchnorm(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every batch norm of ``model`` (grouped or plain) by its synchronised class, in place.

    Each new module holds the replaced one's parameter and buffer tensors. Returns ``model``, or the new module when
    ``model`` is itself a batch norm. Outside a multi-process group the converted layers compute exactly as before.
    ``process_group``: the processes whose batches form the global batch (e.g. the data-parallel ranks of a
    branch-parallel run, which hold the same branches); None: all processes.
    """
    root = _replace(model, _synchronised)
    if process_group is not None:
        group = (process_group.group_name, process_group.size())
        for m in root.modules():
            if isinstance(m, _GlobalBatchStatistics):
                m.sync_group = group
    return root


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` (in place, same tensors), e.g. before export.

    It also undoes torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` on grouped batch norms: the ``nn.SyncBatchNorm``
    made from one becomes the grouped batch norm it was (torch's own, made from plain batch norms, stay).
    """
    return _replace(model, _unsynchronised)
