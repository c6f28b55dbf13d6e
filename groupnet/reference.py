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
    (through :func:`groupnet.model_stacking.extract_branch`).
    """
    from groupnet.model_stacking import extract_branch, num_branches

    k = num_branches(grouped)
    return PerBranch([extract_branch(grouped, i) for i in range(k)], dim=dim)


def cotraining_loss_reference(
    logits: Tensor,
    targets: Tensor,
    branches: int,
    *,
    weight: float,
    divergence: str = "js",
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """SplitNet's co-training loss computed naively, branch by branch (oracle of :mod:`groupnet.cotraining`).

    ``logits``: ``(N, K*C)`` or ``(K, N, C)``; ``targets``: ``(N,)`` indices or ``(N, C)`` soft targets. Returns
    ``(loss, ce (K,), T^2 * D)`` as means over non-ignored samples, with
    ``loss = sum_k CE_k + weight * T^2 * D``; js: ``D = (1/K) sum_k KL(p_k || mean p)``; kl:
    ``D = 1/(K-1) sum_{i != j} KL(p_j.detach() || p_i)``; ``p_k = softmax(z_k / T)``.
    """
    import math

    import torch.nn.functional as F

    z = list(torch.chunk(logits, branches, dim=1)) if logits.dim() == 2 else list(logits.unbind(0))
    if targets.dim() == 1:
        keep = targets != ignore_index
        z, targets = [zk[keep] for zk in z], targets[keep]
    count = max(z[0].shape[0], 1)
    ce = torch.stack([F.cross_entropy(zk, targets, reduction="sum") for zk in z]) / count
    log_p = [F.log_softmax(zk / temperature, dim=-1) for zk in z]
    div = ce.new_zeros(())
    if divergence == "js":
        log_mean = torch.logsumexp(torch.stack(log_p), dim=0) - math.log(branches)
        for lp in log_p:
            div = div + F.kl_div(log_mean, lp, reduction="sum", log_target=True) / branches
    elif divergence == "kl":
        for i in range(branches):
            for j in range(branches):
                if i != j:
                    div = div + F.kl_div(log_p[i], log_p[j].detach(), reduction="sum", log_target=True)
        div = div / max(branches - 1, 1)
    else:
        raise ValueError(f"divergence must be 'js' or 'kl', got {divergence!r}")
    div = div * temperature**2 / count
    return ce.sum() + weight * div, ce, div
