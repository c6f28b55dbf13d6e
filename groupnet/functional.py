"""Functional grouped ops, the public name of :mod:`groupnet.ops` (which picks torch or the Triton kernels).

Weights use the layout of :mod:`groupnet.layout`: a grouped conv weight is ``(K*Cout, Cin/groups, kh, kw)``
(branch k owns rows ``[k*Cout, (k+1)*Cout)``), a grouped linear weight is ``(K, out, in)``.
"""

from groupnet.ops import (
    backend_for,
    batch_norm_scale_shift,
    fold_batch_norm,
    grouped_bn_relu_conv2d,
    grouped_conv2d,
    grouped_conv2d_add,
    grouped_conv2d_bias_act,
    grouped_linear,
    triton_available,
    use_backend,
)

__all__ = [
    "backend_for",
    "batch_norm_scale_shift",
    "fold_batch_norm",
    "grouped_bn_relu_conv2d",
    "grouped_conv2d",
    "grouped_conv2d_add",
    "grouped_conv2d_bias_act",
    "grouped_linear",
    "triton_available",
    "use_backend",
]
