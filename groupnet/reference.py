"""The naive per-branch execution: K plain modules run one after another in a Python loop.

This is the oracle the grouped modules and kernels are tested against, and the "loop" baseline of the benchmarks
(how the SplitNet reference code trains). It works for single layers and for whole models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from groupnet import _checks


class PerBranch(nn.Module):
    """Run K plain modules on their slices of a branch-stacked input and concatenate the outputs.

    Args:
        modules: the K per-branch modules (an ``nn.ModuleList`` is built from them).
        dim: the branch-stacked dimension of input and output: 1 for conv activations ``(N, K*C, H, W)`` and
            linear activations ``(N, K*F)``; -1 for ``(..., K*F)`` features (e.g. layer norm).
        shared_input: feed the whole input to every module (one shared view) instead of splitting it.
    """

    def __init__(self, modules: Sequence[nn.Module], *, dim: int = 1, shared_input: bool = False) -> None:
        super().__init__()
        if len(modules) == 0:
            raise ValueError("PerBranch needs at least one module")
        self.branch_modules = nn.ModuleList(modules)
        self.dim, self.shared_input = dim, shared_input

    @property
    def branches(self) -> int:
        return len(self.branch_modules)

    def forward(self, x: Tensor) -> Tensor:
        k = self.branches
        if self.shared_input:
            parts = [x] * k
        else:
            size = x.shape[self.dim]
            if size % k:
                raise ValueError(f"PerBranch: dim {self.dim} has size {size}, not divisible by {k} branches")
            parts = list(torch.chunk(x, k, dim=self.dim))
        outs = [m(p) for m, p in zip(self.branch_modules, parts)]
        out = torch.cat(outs, dim=self.dim)
        if out.dim() == 4 and x.dim() == 4 and _checks.is_channels_last(x):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def reference_of(grouped: nn.Module, *, dim: int = 1) -> PerBranch:
    """The per-branch reference of a grouped module or model: its K branches taken out and run in a loop.

    Works for every grouped layer (anything with ``branches`` and ``branch(k)``) and for whole grouped models
    (through :func:`groupnet.stacking.extract_branch`).
    """
    from groupnet.stacking import extract_branch, num_branches

    k = num_branches(grouped)
    return PerBranch([extract_branch(grouped, i) for i in range(k)], dim=dim)
