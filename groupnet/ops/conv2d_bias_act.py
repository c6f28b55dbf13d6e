"""The grouped conv with its bias and ReLU fused into the store: ``relu(conv(x, w) + b)``.

On the Triton backend one forward kernel launch (the epilogue adds the bias and applies the ReLU before the store;
the backward kernels take the output's sign as the ReLU mask); on the torch backend ``F.relu(F.conv2d(...))``.
The pattern of a conv with a batch norm folded in (:mod:`groupnet.ops.batch_norm_fold`) followed by a ReLU.
"""

from __future__ import annotations

from torch import Tensor

from groupnet.ops._conv2d_fused import fused_conv2d


def grouped_conv2d_bias_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    branches: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: str | None = "relu",
) -> Tensor:
    """``act(grouped_conv2d(input, weight, bias))`` as one op; arguments as :func:`groupnet.ops.grouped_conv2d`,
    ``activation`` None or ``"relu"``."""
    return fused_conv2d("grouped_conv2d_bias_act", input, weight, bias, branches=branches, stride=stride,
                        padding=padding, dilation=dilation, groups=groups, activation=activation)
