"""Functional grouped ops: the single dispatch point between the torch path and the Triton kernels.

Backend choice, per call:

- ``GROUPNET_BACKEND=torch``: always the torch path.
- ``GROUPNET_BACKEND=triton``: always the Triton kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``;
  the tests use it).
- unset or ``auto`` (default): CUDA tensors go to the Triton kernels when triton is importable, everything
  else to the torch path.

Weights use the layout of :mod:`groupnet.layout`: a grouped conv weight is ``(K*Cout, Cin/groups, kh, kw)``
(branch k owns rows ``[k*Cout, (k+1)*Cout)``), a grouped linear weight is ``(K, out, in)``.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from groupnet import _checks
from groupnet.cpu_conv import conv2d_cpu

_BACKENDS = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton can be imported (it is not installed on every platform)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def backend_for(x: Tensor) -> str:
    """The backend (``"torch"`` or ``"triton"``) a grouped op on ``x`` runs with."""
    choice = os.environ.get("GROUPNET_BACKEND", "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"GROUPNET_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("GROUPNET_BACKEND=triton but triton cannot be imported")
    return choice


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    out = (v, v) if isinstance(v, int) else tuple(v)
    if len(out) != 2 or not all(isinstance(i, int) for i in out):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return out  # type: ignore[return-value]


def grouped_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    branches: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """K independent 2-d convolutions on a channel-stacked input, as one op.

    Args:
        input: ``(N, K*Cin, H, W)``, NCHW or channels_last; branch k reads channels ``[k*Cin, (k+1)*Cin)``.
        weight: ``(K*Cout, Cin/groups, kh, kw)``.
        bias: ``(K*Cout,)`` or None.
        branches: K.
        groups: inner groups of each branch (ResNeXt cardinality); 1 for a plain conv.

    Returns:
        ``(N, K*Cout, OH, OW)`` in the memory format of ``input``.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _checks.check_conv_args(input, weight, bias, branches=branches, groups=groups)
    if backend_for(input) == "triton":
        from groupnet.kernels.grouped_conv2d import grouped_conv2d as triton_conv

        return triton_conv(
            input, weight, bias, branches=branches, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
    if input.device.type == "cpu":
        return conv2d_cpu(input, weight, bias, branches, stride, padding, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, branches * groups)


def grouped_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """K independent linear maps on branch-stacked features, as one op.

    Args:
        input: ``(..., K*in)``; branch k reads features ``[k*in, (k+1)*in)``.
        weight: ``(K, out, in)``.
        bias: ``(K, out)`` or None.

    Returns:
        ``(..., K*out)``.
    """
    _checks.check_linear_args(input, weight, bias)
    if backend_for(input) == "triton":
        from groupnet.kernels.grouped_gemm import grouped_linear as triton_linear

        lead = input.shape[:-1]
        out = triton_linear(input.reshape(-1, input.shape[-1]), weight, bias)
        return out.reshape(*lead, out.shape[-1])
    k, out_f, in_f = weight.shape
    lead = input.shape[:-1]
    x = input.reshape(-1, k, in_f).transpose(0, 1)  # (K, M, in), a view
    if bias is None:
        y = torch.bmm(x, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return y.transpose(0, 1).reshape(*lead, k * out_f)
