"""The grouped conv with a residual added on the store: ``act(conv(x, w) + b + residual)``.

On the Triton backend one forward kernel launch (the epilogue reads the residual tile, adds it before the optional
ReLU and stores once; the sum is never written separately); on the torch backend the unfused composition. The
pattern that closes a ResNet block (with the block's last batch norm folded into ``weight``/``bias``).
"""

from __future__ import annotations

from torch import Tensor

from groupnet.ops._conv2d_fused import fused_conv2d


def grouped_conv2d_add(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    *,
    branches: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: str | None = None,
) -> Tensor:
    """``act(grouped_conv2d(input, weight, bias) + residual)`` as one op.

    ``residual``: the conv output's shape and the input's dtype, any strides. Other arguments as
    :func:`groupnet.ops.grouped_conv2d`; ``activation`` None or ``"relu"`` (applied after the add).
    """
    if residual is None:
        raise ValueError("grouped_conv2d_add: residual is required (use grouped_conv2d_bias_act without one)")
    return fused_conv2d("grouped_conv2d_add", input, weight, bias, branches=branches, stride=stride, padding=padding,
                        dilation=dilation, groups=groups, activation=activation, residual=residual)
