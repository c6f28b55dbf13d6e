"""What the benchmarks measure: the model cases, their data, and how many rounds each gets.

Every peer of a case runs on the same data (seeded) and starts from the same weights: the groupnet model is built
first and every other peer is made from it (its branches taken out, stacked for vmap, or its layers swapped for
torch's or torch-uncertainty's), except the dense network, which is its own unsplit model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_CLASSES = 10
IMAGE_SIZE = 32
ARCHS = ("wrn-16-4", "resnet56")
BRANCHES = (2, 4)
TRAIN_BATCHES = (8, 128)
INFER_BATCHES = (1, 8, 128)
# The co-training loss of the split peers and the training hyper-parameters of every peer. The learning rate is
# small so that repeating the step on one batch never diverges (a NaN would make the loss's finite check raise).
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 5e-4


def glibc_default() -> bool:
    """GROUPNET_BENCH_GLIBC_DEFAULT=1: leave glibc's malloc as it is instead of retaining freed memory
    (NOTES.md item 8)."""
    return os.environ.get("GROUPNET_BENCH_GLIBC_DEFAULT", "0") == "1"


def quick() -> bool:
    """GROUPNET_BENCH_QUICK=1: a small subset of the cases, one round each, to check the suite runs (numbers
    meaningless): every peer but the torch.compile ones runs, at K = 2 and the smallest batches only."""
    return os.environ.get("GROUPNET_BENCH_QUICK", "0") == "1"


@dataclass(frozen=True)
class ModelCase:
    """One model benchmark: ``arch`` split into ``branches``, a ``mode`` ("train" or "infer") at ``batch``."""

    arch: str
    branches: int
    batch: int
    mode: str

    @property
    def id(self) -> str:
        return f"{self.arch}-K{self.branches}-b{self.batch}-{self.mode}"

    @property
    def rounds(self) -> tuple[int, int]:
        """(warm-up rounds, measured rounds): fewer for the slow batch-128 steps so the suite stays short."""
        if quick():
            return 1, 1
        if self.batch >= 128:
            return (1, 3) if self.mode == "train" else (1, 5)
        return (2, 12) if self.mode == "train" else (3, 20)

    @property
    def compiles(self) -> bool:
        """The torch.compile peers run here: training only (each compile costs tens of seconds even with a warm
        cache, minutes with a cold one, so not at every inference batch too), and never under --quick."""
        return self.mode == "train" and not quick()


def op_rounds() -> tuple[int, int]:
    """(warm-up rounds, measured rounds) of every op-level benchmark."""
    return (1, 1) if quick() else (2, 20)


def rounds_summary() -> str:
    """The rounds in force, for RESULTS.md."""
    parts = []
    for batch, mode in ((128, "train"), (128, "infer"), (8, "train"), (8, "infer")):
        warm, n = ModelCase("any", 2, batch, mode).rounds
        parts.append(f"batch {'128' if batch == 128 else '<= 8'} {mode} {warm} warm-up + {n}")
    warm, n = op_rounds()
    compiled = "no torch.compile peers (--quick)" if quick() else "the torch.compile peers at training only"
    return "; ".join(parts) + f"; ops {warm} + {n}; {compiled}"


def model_cases() -> list[ModelCase]:
    if quick():
        return [ModelCase(arch, 2, batch, mode) for arch in ARCHS for batch, mode in ((8, "train"), (1, "infer"))]
    cases = []
    for arch in ARCHS:
        for k in BRANCHES:
            cases += [ModelCase(arch, k, b, "train") for b in TRAIN_BATCHES]
            cases += [ModelCase(arch, k, b, "infer") for b in INFER_BATCHES]
    return cases


def model_data(case: ModelCase, seed: int = 0) -> tuple[Tensor, Tensor]:
    """K per-branch views ``(N, K*3, 32, 32)`` (NCHW, contiguous) and class targets ``(N,)``."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(case.batch, case.branches * 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (case.batch,), generator=g)
    return views, targets


def set_threads() -> int:
    """Intra-op threads for every benchmark: GROUPNET_BENCH_THREADS, default all cores (2 on the dev machine)."""
    n = int(os.environ.get("GROUPNET_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n
