"""Input validation shared by the grouped modules, the ops and the kernels: errors name what was expected and what came.

This module sits below everything else in groupnet (the Triton kernels may import it and nothing else of groupnet),
so it holds only plain checks and the few names every layer must agree on.
"""

from __future__ import annotations

import torch
from torch import Tensor


DIVERGENCES = ("js", "kl")
"""Divergences of the co-training loss: generalised Jensen-Shannon, and SplitNet's pairwise KL with detached teachers."""


def pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair (conv stride, padding, dilation, kernel size)."""
    out = (v, v) if isinstance(v, int) else tuple(v)
    if len(out) != 2 or not all(isinstance(i, int) for i in out):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return out  # type: ignore[return-value]


def check_divergence(divergence: str, what: str = "divergence") -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"{what} must be one of {DIVERGENCES}, got {divergence!r}")


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


def check_float_input(x: Tensor, p: Tensor | None, what: str) -> None:
    """A floating-point input of the parameters' dtype; a float16/bfloat16 input with float32 parameters (autocast's
    mixed precision) is accepted too."""
    if not x.is_floating_point():
        raise TypeError(f"{what}: expects a floating-point input, got {x.dtype}")
    if p is not None and x.dtype != p.dtype and not (
            x.dtype in (torch.float16, torch.bfloat16) and p.dtype == torch.float32):
        raise TypeError(f"{what}: input dtype {x.dtype} does not match the parameters' dtype {p.dtype} (convert one "
                        "with .to(dtype))")


def check_bias(bias: Tensor | None, weight: Tensor, shape: tuple[int, ...], what: str) -> None:
    """The bias (if any) has ``shape`` and the weight's dtype and device."""
    if bias is None:
        return
    if tuple(bias.shape) != shape:
        raise ValueError(f"{what} bias must have shape {shape}, got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise RuntimeError(f"{what}: bias is on {bias.device} but the weights are on {weight.device}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{what}: bias dtype {bias.dtype} does not match weight dtype {weight.dtype}")


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
    check_bias(bias, weight, (weight.shape[0],), "grouped_conv2d")


def check_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 3:
        raise ValueError(f"grouped_linear weight must be (K, out, in), got shape {tuple(weight.shape)}")
    k, out_f, in_f = weight.shape
    if x.dim() < 1:
        raise ValueError("grouped_linear expects an input of at least 1 dimension, got a scalar")
    check_channels(x.shape[-1], k, in_f, "grouped_linear", "features")
    check_same(x, weight, "grouped_linear")
    check_bias(bias, weight, (k, out_f), "grouped_linear")


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
"""Device types whose autocast state the grouped ops follow."""


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs conv/linear in on ``device_type`` (``"cpu"``, ``"cuda"``), None when it is off there."""
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The cast policy of the grouped conv and linear ops under autocast: the one of ``nn.Conv2d``/``nn.Linear``.

    With autocast enabled on ``device_type``, every float32/float16/bfloat16 tensor is cast to autocast's dtype
    (torch's "lower precision" op list, where conv2d, linear, bmm and baddbmm are); float64, integer tensors and None
    pass through unchanged (so float64 stays an error against lower-precision weights, as in torch). Off: unchanged.
    """
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
