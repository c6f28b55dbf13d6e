"""The zoo blocks' fused forms on the Triton backend: which blocks may take them and the conv calls they make.

A pre-activation block's batch norm + ReLU runs on the conv's operand load (:func:`bn_relu_conv`) and its residual
add on the store of the block's last conv; at inference a post-activation block's batch norms fold into its convs
(:func:`folded_conv`), with the ReLU and the residual add in the conv's epilogue. The torch backend keeps the plain
module composition, so CPU results do not change. A block takes the fused form only when the result is the same
function of the same parameters (:func:`fusable`); otherwise it runs its modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from groupnet.modules import GroupedBatchNorm2d, GroupedConv2d
from groupnet.ops import backend_for, batch_norm_scale_shift, fold_batch_norm, grouped_bn_relu_conv2d
from groupnet.ops import grouped_conv2d_add, grouped_conv2d_bias_act


def _plain(m: nn.Module) -> bool:
    """A grouped conv or batch norm of exactly the base class (not a dynamic, sync or other subclass with its own
    forward), without hooks (the fused form does not call its forward) and, for a conv, zero padding in the conv."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    if type(m) is GroupedConv2d:
        return m._input_pad is None and m.padding_mode == "zeros"
    return type(m) is GroupedBatchNorm2d


def fusable(x: Tensor, *modules: nn.Module | None) -> bool:
    """True when a block may run its fused form on ``x``: a concrete tensor on the Triton backend, every given module
    (None skipped) a plain grouped conv or batch norm, and no global module hooks."""
    if not isinstance(x, Tensor) or torch.jit.is_scripting() or backend_for(x) != "triton":
        return False
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return all(_plain(m) for m in modules if m is not None)


def foldable(*bns: nn.Module | None) -> bool:
    """True when each batch norm (None skipped) normalises with running statistics (eval mode, statistics kept)."""
    return all(bn is None or (not bn.training and bn.running_mean is not None and bn.running_var is not None)
               for bn in bns)


def bn_scale_shift(bn: GroupedBatchNorm2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """``bn(x) == x * scale + shift`` per channel, with the module's side effects (in training: the batch counter
    and the running statistics, updated as ``nn.BatchNorm2d.forward`` does)."""
    bn._check(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return batch_norm_scale_shift(x, bn.running_mean if keep else None, bn.running_var if keep else None, bn.weight,
                                  bn.bias, training=batch_stats, momentum=factor, eps=bn.eps)


def _conv_args(conv: GroupedConv2d) -> dict:
    return dict(branches=conv.branches, stride=conv.stride, padding=conv._conv_padding, dilation=conv.dilation,
                groups=conv.groups)


def bn_relu_conv(x: Tensor, scale: Tensor, shift: Tensor, conv: GroupedConv2d, residual: Tensor | None = None) -> Tensor:
    """``conv(relu(x * scale + shift)) [+ residual]`` as one fused op."""
    return grouped_bn_relu_conv2d(x, scale, shift, conv.weight, conv.bias, residual=residual, **_conv_args(conv))


def folded_conv(x: Tensor, conv: GroupedConv2d, bn: GroupedBatchNorm2d, *, relu: bool,
                residual: Tensor | None = None) -> Tensor:
    """``act(bn(conv(x)) [+ residual])`` with ``bn`` in eval mode folded into the conv, as one fused op."""
    w, b = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    activation = "relu" if relu else None
    if residual is None:
        return grouped_conv2d_bias_act(x, w, b, activation=activation, **_conv_args(conv))
    return grouped_conv2d_add(x, w, b, residual, activation=activation, **_conv_args(conv))
