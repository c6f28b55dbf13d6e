"""Multi-process data parallelism: process-group setup from ``torchrun``'s environment, and batch norm whose
statistics are synchronised across processes (also on CPU/gloo, where ``nn.SyncBatchNorm`` refuses to run).

Why our own synchronised batch norm: with per-process statistics, W processes with batch B/W normalise differently
from one process with batch B, so a DDP run would not reproduce a single-process run. :func:`convert_sync_batchnorm`
switches every batch norm (grouped or plain) to a subclass whose training forward all-reduces the per-channel sum
and squared deviation with the differentiable ``torch.distributed.nn.functional.all_reduce``; parameters, buffers,
``state_dict`` keys and ``branch(k)`` stay as they were, so checkpoints and branch export are unchanged.

What else makes W processes equal to one (tested in tests/test_ddp.py, CPU/gloo): the global batch is split by
rank inside each global batch (:class:`groupnet.data.sampler.EpochSampler`), augmentation is seeded per sample and
epoch, and DDP averages the per-process mean losses, which equals the global mean since every process has the same
number of samples. Not equal by design: mixup (each process permutes its own part of the batch) and dropout (each
process draws masks for its own part from the same seed), so runs using them are statistically, not bitwise,
equivalent. Evaluation is sharded over the processes and the counts are summed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """This process's place: rank, world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def context_from_env() -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by torchrun (absent: one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(ctx: DistContext, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when there is more than one process."""
    if ctx.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timedelta(minutes=10))


def destroy_process_group(*, wait_for_all: bool = False) -> None:
    """Leave the process group. ``wait_for_all``: first wait until every process gets here (the end of a successful
    run), so no process tears its connections down while another still uses them; gloo then aborts that one with
    "terminate called without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def world_is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a tensor over processes (identity in one process); returns a new tensor."""
    t = t.clone()
    if world_is_distributed():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if world_is_distributed():
        dist.barrier()


class _SyncBatchNormMixin:
    """Training forward with statistics over the whole global batch (two differentiable all-reduces)."""

    def wrap_branch_module(self, plain: nn.Module) -> None:
        """Branch-major execution (:mod:`groupnet.branch_major`) runs a plain batch norm per branch: sync it too."""
        plain.__class__ = _sync_class(type(plain))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not (self.training and world_is_distributed()):
            return super().forward(x)  # type: ignore[misc]
        if hasattr(self, "_check"):
            self._check(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        local_count = xf.new_full((1,), x.numel() // c)
        sums = all_reduce(torch.cat([xf.sum(dims), local_count]))
        count = sums[c]
        mean = sums[:c] / count
        centred = xf - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


_SYNC_CLASSES: dict[type, type] = {}


def _sync_class(cls: type) -> type:
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type(f"Sync{cls.__name__}", (_SyncBatchNormMixin, cls), {"__module__": __name__})
    return _SYNC_CLASSES[cls]


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every batch norm of ``model`` synchronise its training statistics across processes (in place).

    Outside a multi-process group the converted layers behave exactly as before.
    """
    for m in model.modules():
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        if is_bn and not isinstance(m, (_SyncBatchNormMixin, nn.SyncBatchNorm)):
            m.__class__ = _sync_class(type(m))
    return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` (in place), e.g. before export."""
    for m in model.modules():
        if isinstance(m, _SyncBatchNormMixin):
            m.__class__ = type(m).__mro__[2]
    return model
