"""Input validation shared by the grouped modules and functional ops: errors name what was expected and what came."""

from __future__ import annotations

import torch
from torch import Tensor


def check_positive(**values: int) -> None:
    """Raise ValueError for any size that is not a positive int."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_rank(x: Tensor, rank: int | tuple[int, ...], what: str) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    if x.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{what} expects a {want}-d input, got shape {tuple(x.shape)} ({x.dim()}-d)")


def check_channels(size: int, branches: int, per_branch: int, what: str, dim_name: str = "channels") -> None:
    if size != branches * per_branch:
        raise ValueError(
            f"{what} expects {dim_name} = branches*{dim_name}_per_branch = {branches}*{per_branch} = "
            f"{branches * per_branch}, got {size}"
        )


def check_same(x: Tensor, p: Tensor, what: str) -> None:
    """The input must match the parameters' dtype and device (no silent casts or transfers)."""
    if x.device != p.device:
        raise RuntimeError(f"{what}: input is on {x.device} but the weights are on {p.device}")
    if x.dtype != p.dtype:
        raise TypeError(f"{what}: input dtype {x.dtype} does not match weight dtype {p.dtype}")


def check_conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, *, branches: int, groups: int) -> None:
    check_positive(branches=branches, groups=groups)
    check_rank(x, 4, "grouped_conv2d")
    if weight.dim() != 4:
        raise ValueError(f"grouped_conv2d weight must be (K*Cout, Cin/groups, kh, kw), got shape {tuple(weight.shape)}")
    g = branches * groups
    if weight.shape[0] % g:
        raise ValueError(
            f"grouped_conv2d weight has {weight.shape[0]} output channels, not divisible by branches*groups = {g}"
        )
    check_channels(x.shape[1], g, weight.shape[1], "grouped_conv2d", "input channels")
    check_same(x, weight, "grouped_conv2d")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"grouped_conv2d bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 3:
        raise ValueError(f"grouped_linear weight must be (K, out, in), got shape {tuple(weight.shape)}")
    k, out_f, in_f = weight.shape
    if x.dim() < 1:
        raise ValueError("grouped_linear expects an input of at least 1 dimension, got a scalar")
    check_channels(x.shape[-1], k, in_f, "grouped_linear", "features")
    check_same(x, weight, "grouped_linear")
    if bias is not None and tuple(bias.shape) != (k, out_f):
        raise ValueError(f"grouped_linear bias must have shape ({k}, {out_f}), got {tuple(bias.shape)}")


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
