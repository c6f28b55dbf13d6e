"""Multi-process data parallelism: process-group setup from ``torchrun``'s environment and small collectives.

The batch norm whose statistics are synchronised across processes lives with the layers
(:mod:`groupnet.modules.sync_batchnorm`); :func:`convert_sync_batchnorm` and :func:`revert_sync_batchnorm` are
re-exported here for the trainer and the export. Together with it, what makes W processes equal to one (tested in
tests/test_ddp.py, CPU/gloo): the global batch is split by rank inside each global batch
(:class:`groupnet.data.sampler.EpochSampler`), augmentation is seeded per sample and epoch, and DDP averages the
per-process mean losses, which equals the global mean since every process has the same number of samples. Not
equal by design: mixup (each process permutes its own part of the batch) and dropout (each process draws masks for
its own part from the same seed), so runs using them are statistically, not bitwise, equivalent. Evaluation is
sharded over the processes and the counts are summed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from groupnet.modules.sync_batchnorm import convert_sync_batchnorm, revert_sync_batchnorm, world_is_distributed

__all__ = [
    "DistContext", "all_reduce_sum", "barrier", "context_from_env", "convert_sync_batchnorm", "destroy_process_group",
    "init_process_group", "revert_sync_batchnorm", "world_is_distributed",
]


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


#: Seconds a process waits in a collective for the others (process-group timeout) unless told otherwise. On CPU a
#: process that died or hangs is noticed after this long; CUDA runs have longer pauses (compilation, large saves).
DEFAULT_TIMEOUT_S = {"cpu": 180.0, "cuda": 600.0}


def init_process_group(ctx: DistContext, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when there is more than one process.

    ``timeout_s``: how long a collective waits for a process that stopped responding before it fails (default
    :data:`DEFAULT_TIMEOUT_S` for the device type)."""
    if ctx.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        seconds = timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S.get(device.type, 600.0)
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timedelta(seconds=seconds))


def destroy_process_group(*, wait_for_all: bool = False) -> None:
    """Leave the process group. ``wait_for_all``: first wait until every process gets here (the end of a successful
    run), so no process tears its connections down while another still uses them; gloo then aborts that one with
    "terminate called without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a tensor over processes (identity in one process); returns a new tensor."""
    t = t.clone()
    if world_is_distributed():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if world_is_distributed():
        dist.barrier()
