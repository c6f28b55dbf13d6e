"""The tensor layout of K branches, and helpers to move between it and per-branch tensors.

A conv activation of K branches with C channels each is ``(N, K*C, H, W)``: branch k owns channels
``[k*C, (k+1)*C)``. A linear activation is ``(N, K*F)``, branch k owning features ``[k*F, (k+1)*F)``. Because the
branch axis is folded into the channel axis, every per-channel torch op (ReLU, pooling, dropout, residual adds,
BatchNorm over K*C channels) already acts branch by branch, and channels_last memory format is kept.

Each branch may see its own input (K augmented views of the same images, stacked with :func:`stack`), or all
branches may see one shared input (:func:`repeat`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from groupnet._checks import check_positive


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack K per-branch tensors ``(N, C, ...)`` into the layout ``(N, K*C, ...)``.

    channels_last is kept when every input is channels_last.
    """
    if len(tensors) == 0:
        raise ValueError("stack needs at least one tensor")
    first = tensors[0]
    for k, t in enumerate(tensors):
        if t.dim() < 2:
            raise ValueError(f"stack expects tensors of shape (N, C, ...), tensor {k} has shape {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"stack expects equal shapes, tensor 0 is {tuple(first.shape)}, tensor {k} is {tuple(t.shape)}")
    out = torch.cat(list(tensors), dim=1)
    if first.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def unstack(x: Tensor, branches: int) -> Tensor:
    """View the layout ``(N, K*C, ...)`` as ``(K, N, C, ...)`` (a view when possible, no copy)."""
    check_positive(branches=branches)
    if x.dim() < 2:
        raise ValueError(f"unstack expects (N, K*C, ...), got shape {tuple(x.shape)}")
    n, kc = x.shape[0], x.shape[1]
    if kc % branches:
        raise ValueError(f"unstack: channel dim {kc} is not divisible by branches={branches}")
    return x.unflatten(1, (branches, kc // branches)).transpose(0, 1)


def branch_slice(x: Tensor, k: int, branches: int) -> Tensor:
    """Branch k's part ``(N, C, ...)`` of a layout tensor ``(N, K*C, ...)`` (a view)."""
    if not 0 <= k < branches:
        raise IndexError(f"branch index {k} out of range for {branches} branches")
    c = x.shape[1] // branches
    return x[:, k * c : (k + 1) * c]


def repeat(x: Tensor, branches: int) -> Tensor:
    """One shared input ``(N, C, ...)`` fed to all K branches: ``(N, K*C, ...)``, memory format kept."""
    check_positive(branches=branches)
    if x.dim() < 2:
        raise ValueError(f"repeat expects (N, C, ...), got shape {tuple(x.shape)}")
    reps = [1, branches] + [1] * (x.dim() - 2)
    out = x.repeat(*reps)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
