"""The grouped ops: the one place that picks torch or the Triton kernels, and validates each call once.

One file per op (``conv2d``, ``linear``, ``cotrain_loss``, and the fused conv patterns ``conv2d_bias_act``,
``conv2d_add``, ``bn_relu_conv2d`` with ``batch_norm_fold``), each holding its validation, its torch path and its
dispatch to ``groupnet.kernels``; :mod:`groupnet.ops.backend` holds the switch (:func:`use_backend` and the
environment variable it overrides). :mod:`groupnet.functional` is the public name of the tensor ops.
"""

from groupnet.ops.backend import (
    BACKENDS,
    backend_for,
    get_backend,
    prefers_channels_last,
    triton_available,
    use_backend,
)
from groupnet.ops.batch_norm_fold import batch_norm_scale_shift, fold_batch_norm
from groupnet.ops.bn_relu_conv2d import grouped_bn_relu_conv2d
from groupnet.ops.conv2d import grouped_conv2d
from groupnet.ops.conv2d_add import grouped_conv2d_add
from groupnet.ops.conv2d_bias_act import grouped_conv2d_bias_act
from groupnet.ops.cotrain_loss import CoTrainLossRows, cotrain_loss
from groupnet.ops.linear import grouped_linear

__all__ = [
    "BACKENDS",
    "CoTrainLossRows",
    "backend_for",
    "batch_norm_scale_shift",
    "cotrain_loss",
    "fold_batch_norm",
    "get_backend",
    "grouped_bn_relu_conv2d",
    "grouped_conv2d",
    "grouped_conv2d_add",
    "grouped_conv2d_bias_act",
    "grouped_linear",
    "prefers_channels_last",
    "triton_available",
    "use_backend",
]
