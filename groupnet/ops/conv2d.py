"""The grouped 2-d convolution op: K independent convolutions of a channel-stacked input, as one op.

Validated here, once; then the torch path (one grouped ``F.conv2d`` with ``groups = K * groups``, oneDNN on CPU,
cuDNN on CUDA) or the Triton implicit-GEMM kernels (``groupnet.kernels.grouped_conv2d``), as
:mod:`groupnet.ops.backend` chooses. On CPU one grouped conv was as fast as or faster than a loop of K per-branch
convs for every measured shape and pass (``benchmarks/NOTES.md``), so the torch path has no per-shape choice.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from groupnet import _checks
from groupnet.ops.backend import backend_for


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
        weight: ``(K*Cout, Cin/groups, kh, kw)`` (branch k owns rows ``[k*Cout, (k+1)*Cout)``).
        bias: ``(K*Cout,)`` or None.
        branches: K.
        groups: inner groups of each branch (ResNeXt cardinality); 1 for a plain conv.

    Returns:
        ``(N, K*Cout, OH, OW)`` in the memory format of ``input``.

    Under ``torch.autocast`` it casts as ``nn.Conv2d`` does: float32/16 operands to autocast's dtype.
    """
    if isinstance(input, Tensor):
        input, weight, bias = _checks.autocast_inputs(input.device.type, input, weight, bias)
    stride = _checks.pair(stride, "stride")
    padding = _checks.pair(padding, "padding")
    dilation = _checks.pair(dilation, "dilation")
    _checks.check_conv_args(input, weight, bias, branches=branches, groups=groups)
    if backend_for(input) == "triton":
        from groupnet.kernels.grouped_conv2d import run_grouped_conv2d

        return run_grouped_conv2d(input, weight, bias, branches=branches, stride=stride, padding=padding,
                                  dilation=dilation, groups=groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, branches * groups)
