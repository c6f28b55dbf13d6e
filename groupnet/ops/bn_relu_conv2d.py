"""The pre-activation grouped conv: a per-input-channel affine map and ReLU (a batch norm + ReLU) applied to the
conv's operand as it is loaded, ``act(conv(relu(x * scale + shift), w) + b [+ residual])``.

On the Triton backend one forward kernel launch: the pre-activated input is never written (the conv's zero padding
is applied after the ReLU, as for a conv of the materialised activation); the backward recomputes it. On the torch
backend the unfused composition. The pattern of a pre-activation (WRN) block, where ``scale``/``shift`` come from the
batch norm (:func:`groupnet.ops.batch_norm_fold.batch_norm_scale_shift`).
"""

from __future__ import annotations

from torch import Tensor

from groupnet.ops._conv2d_fused import fused_conv2d


def grouped_bn_relu_conv2d(
    input: Tensor,
    scale: Tensor,
    shift: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    branches: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    residual: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """``act(grouped_conv2d(relu(input * scale + shift), weight, bias) [+ residual])`` as one op.

    ``scale``, ``shift``: ``(K*Cin,)``, one value per input channel, differentiable (computed in float32, float64
    for float64 input). ``residual`` as in :func:`groupnet.ops.grouped_conv2d_add`. Other arguments as
    :func:`groupnet.ops.grouped_conv2d`.
    """
    return fused_conv2d("grouped_bn_relu_conv2d", input, weight, bias, branches=branches, stride=stride,
                        padding=padding, dilation=dilation, groups=groups, activation=activation, pre_scale=scale,
                        pre_shift=shift, residual=residual)
