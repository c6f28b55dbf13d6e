"""The grouped linear op: K independent linear maps on branch-stacked features, as one op.

Validated here, once; then the torch path (one ``torch.baddbmm`` over the ``(K, M, in)`` view of the input) or the
Triton grouped GEMM (``groupnet.kernels.grouped_gemm``), as :mod:`groupnet.ops.backend` chooses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from groupnet import _checks
from groupnet.ops.backend import backend_for


def grouped_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """K independent linear maps on branch-stacked features, as one op.

    Args:
        input: ``(..., K*in)``; branch k reads features ``[k*in, (k+1)*in)``.
        weight: ``(K, out, in)``.
        bias: ``(K, out)`` or None.

    Returns:
        ``(..., K*out)``.

    Under ``torch.autocast`` it casts as ``nn.Linear`` does: float32/16 operands to autocast's dtype.
    """
    if isinstance(input, Tensor):
        input, weight, bias = _checks.autocast_inputs(input.device.type, input, weight, bias)
    _checks.check_linear_args(input, weight, bias)
    k, out_f, in_f = weight.shape
    lead = input.shape[:-1]
    if backend_for(input) == "triton":
        from groupnet.kernels.grouped_gemm import run_grouped_linear

        out = run_grouped_linear(input.reshape(-1, input.shape[-1]), weight, bias)
        return out.reshape(*lead, out.shape[-1])
    x = input.reshape(-1, k, in_f).transpose(0, 1)  # (K, M, in), a view
    if bias is None:
        y = torch.bmm(x, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return y.transpose(0, 1).reshape(*lead, k * out_f)
