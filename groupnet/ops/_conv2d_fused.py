"""Shared validation and dispatch of the fused grouped conv ops (``conv2d_bias_act``, ``conv2d_add``,
``bn_relu_conv2d``): ``act(conv(relu(x * scale + shift) or x, w, b) + residual)``.

The torch path is the unfused composition (per-channel affine map and ReLU, one grouped ``F.conv2d``, the add, the
ReLU), which is also the reference the Triton path is tested against; the Triton path is one forward kernel launch
(``groupnet.kernels.grouped_conv2d_fused``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from groupnet import _checks
from groupnet.ops.backend import backend_for

ACTIVATIONS = (None, "relu")


def conv_output_size(input: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, ...]:
    """The ``(N, Cout, OH, OW)`` of a conv of ``input`` with ``weight``."""
    n, _, h, w = input.shape
    kh, kw = weight.shape[2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, weight.shape[0], oh, ow)


def fused_conv2d(
    what: str,
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    branches: int,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    groups: int,
    activation: str | None,
    pre_scale: Tensor | None = None,
    pre_shift: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """Validate (errors name ``what``), cast under autocast as ``nn.Conv2d`` does, then run torch or Triton."""
    if isinstance(input, Tensor):
        input, weight, bias, residual = _checks.autocast_inputs(input.device.type, input, weight, bias, residual)
    stride = _checks.pair(stride, "stride")
    padding = _checks.pair(padding, "padding")
    dilation = _checks.pair(dilation, "dilation")
    _checks.check_conv_args(input, weight, bias, branches=branches, groups=groups)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    if pre_scale is not None or pre_shift is not None:
        channels = input.shape[1]
        for name, t in (("scale", pre_scale), ("shift", pre_shift)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != (channels,):
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{what}: {name} must be a floating-point ({channels},) tensor (one value per input "
                                 f"channel), got {got}")
            if t.device != input.device:
                raise RuntimeError(f"{what}: {name} is on {t.device} but the input on {input.device}")
        pre_scale, pre_shift = pre_scale.to(acc).contiguous(), pre_shift.to(acc).contiguous()
    if residual is not None:
        size = conv_output_size(input, weight, stride, padding, dilation)
        if not isinstance(residual, Tensor) or tuple(residual.shape) != size:
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"{what}: residual must have the conv output's shape {size}, got {got}")
        if residual.dtype != input.dtype or residual.device != input.device:
            raise TypeError(f"{what}: residual must be {input.dtype} on {input.device} like the input, got "
                            f"{residual.dtype} on {residual.device}")
    if backend_for(input) == "triton":
        from groupnet.kernels.grouped_conv2d_fused import run_grouped_conv2d_fused

        return run_grouped_conv2d_fused(input, weight, bias, branches=branches, stride=stride, padding=padding,
                                        dilation=dilation, groups=groups, activation=activation, pre_scale=pre_scale,
                                        pre_shift=pre_shift, residual=residual)
    h = input
    if pre_scale is not None:
        h = F.relu(input.to(acc) * pre_scale.reshape(1, -1, 1, 1) + pre_shift.reshape(1, -1, 1, 1)).to(input.dtype)
    y = F.conv2d(h, weight, bias, stride, padding, dilation, branches * groups)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation == "relu" else y
