"""A batch norm as the per-channel affine map it applies, ``y = x * scale + shift``, and folded into the conv
before it.

The fused conv ops take a batch norm in this form: :func:`batch_norm_scale_shift` gives the ``(scale, shift)`` the
pre-activation op (:func:`groupnet.ops.grouped_bn_relu_conv2d`) applies on the operand load, from the batch's
statistics in training (updating the running ones as ``F.batch_norm`` does) or from the running ones;
:func:`fold_batch_norm` gives the weight and bias of ``bn(conv(x))`` in eval mode as one conv. Both are torch ops on
tensors of size C (differentiable), the same on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_norm_scale_shift(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``F.batch_norm(input, ...) == input * scale + shift`` per channel of ``(N, C, H, W)``.

    Arguments as ``F.batch_norm``: with ``training`` (or no running statistics) the batch's mean and biased variance
    normalise, and given running statistics are updated in place with factor ``momentum`` (unbiased variance);
    otherwise the running statistics normalise. Statistics are computed in float32 (float64 for float64 input).
    """
    if input.dim() != 4:
        raise ValueError(f"batch_norm_scale_shift expects (N, C, H, W), got shape {tuple(input.shape)}")
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    if training or running_mean is None or running_var is None:
        count = input.shape[0] * input.shape[2] * input.shape[3]
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        var, mean = torch.var_mean(input.to(acc), dim=(0, 2, 3), correction=0)
        if training and running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                unbiased = var.detach() * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return scale, shift


def fold_batch_norm(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the one conv equal to ``bn(conv(x))`` with the batch norm in eval mode.

    Output channel c of the conv is channel c of the batch norm, so on the branch-stacked layout this is per branch
    for free. Differentiable in every argument; the weight keeps ``conv_weight``'s dtype and memory format.
    """
    if running_mean.shape != (conv_weight.shape[0],):
        raise ValueError(f"cannot fold a batch norm of {tuple(running_mean.shape)} channels into a conv of "
                         f"{conv_weight.shape[0]} output channels")
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    bias = -running_mean if conv_bias is None else conv_bias - running_mean
    bias = bias * scale
    if bn_bias is not None:
        bias = bias + bn_bias
    weight = conv_weight * scale.to(conv_weight.dtype).reshape(-1, 1, 1, 1)
    return weight, bias.to(conv_weight.dtype)
