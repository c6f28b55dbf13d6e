"""Grouped conv2d with fused neighbours on the Triton forward kernel: a per-input-channel affine map + ReLU on the
operand load (a pre-activation batch norm + ReLU), bias + ReLU and a residual add in the store epilogue.

``y = act(conv(relu(x * scale + shift) or x, w) + b + residual)``. The forward is one custom op
(``groupnet::grouped_conv2d_fused_forward``) running the forward kernel with its ``PRE_AFFINE_RELU`` and
``HAS_RESIDUAL`` flags; the pre-activated input and the sum before the activation are never written.

The backward is :class:`GroupedConv2dFusedFunction`: the unfused backward kernels (the input- and weight-gradient
custom ops of :mod:`.grouped_conv2d`) for the conv, with the output's ReLU mask applied inside them as for the plain
epilogue, and torch for the rest: the pre-activated input is recomputed for the weight gradient, the affine map's
and the ReLU's gradients are elementwise products and per-channel sums, the residual's gradient is the masked output
gradient.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from groupnet import _checks

from ._common import CompileSpec, check_input_precision, default_input_precision
from .grouped_conv2d import _geometry, _launch_kwargs, _memory_format, _new_output
from ._grouped_conv2d_common import MNK_BLOCKS
from .grouped_conv2d_fwd import ACTIVATIONS, PROLOGUE_FWD_CONFIGS, grouped_conv2d_fwd


@torch.library.custom_op("groupnet::grouped_conv2d_fused_forward", mutates_args=())
def grouped_conv2d_fused_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pre_scale: Tensor | None,
    pre_shift: Tensor | None,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str | None,
    input_precision: str,
) -> Tensor:
    """``act(conv2d(relu(x * pre_scale + pre_shift) or x, weight, bias, groups=groups) + residual)`` as a new tensor
    in x's memory format."""
    geom = _geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    out = _new_output(geom.output_size, x, _checks.is_channels_last(x))
    return grouped_conv2d_fwd(x, weight, bias, out, activation=activation, pre_scale=pre_scale, pre_shift=pre_shift,
                              residual=residual, **_launch_kwargs(geom, input_precision))


@grouped_conv2d_fused_forward.register_fake
def _(x, weight, bias, pre_scale, pre_shift, residual, stride, padding, dilation, groups, activation, input_precision):
    geom = _geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    return x.new_empty(geom.output_size).contiguous(memory_format=_memory_format(_checks.is_channels_last(x)))


def _channel(t: Tensor) -> Tensor:
    return t.reshape(1, -1, 1, 1)


class GroupedConv2dFusedFunction(torch.autograd.Function):
    """Autograd of :func:`run_grouped_conv2d_fused` (first derivatives only).

    Backward: the unfused input- and weight-gradient kernels for the conv (given the output as ReLU mask when the
    activation is fused), torch for the prologue's affine map and ReLU (the pre-activated input is recomputed, not
    saved) and for the residual.
    """

    @staticmethod
    def forward(x, weight, bias, pre_scale, pre_shift, residual, stride, padding, dilation, groups, activation,
                input_precision):  # fmt: skip
        return torch.ops.groupnet.grouped_conv2d_fused_forward(
            x, weight, bias, pre_scale, pre_shift, residual, stride, padding, dilation, groups, activation,
            input_precision,
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, pre_scale, pre_shift, residual, stride, padding, dilation, groups, activation, precision = inputs
        ctx.save_for_backward(x, weight, pre_scale, pre_shift, output if activation == "relu" else None)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.input_precision = precision
        ctx.x_channels_last = _checks.is_channels_last(x)
        ctx.w_channels_last = _checks.is_channels_last(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, pre_scale, pre_shift, relu_output = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b, need_scale, need_shift, need_residual = ctx.needs_input_grad[:6]
        pre = pre_scale is not None
        conv_input, pre_positive = x, None
        if pre:  # recompute the prologue: relu(x * scale + shift), in the kernel's precision
            z = x.to(pre_scale.dtype) * _channel(pre_scale) + _channel(pre_shift)
            pre_positive = z > 0
            conv_input = torch.relu(z).to(x.dtype)
        grads: list[Tensor | None] = [None] * 12
        if need_x or (pre and (need_scale or need_shift)):
            grad_in = torch.ops.groupnet.grouped_conv2d_backward_input(
                grad_out, weight, relu_output, list(x.shape), stride, padding, dilation, groups,
                ctx.x_channels_last, ctx.input_precision,
            )  # fmt: skip
            if pre:
                grad_z = torch.where(pre_positive, grad_in.to(pre_scale.dtype), 0.0)
                grads[0] = (grad_z * _channel(pre_scale)).to(x.dtype) if need_x else None
                grads[3] = (grad_z * x.to(pre_scale.dtype)).sum((0, 2, 3)) if need_scale else None
                grads[4] = grad_z.sum((0, 2, 3)) if need_shift else None
            else:
                grads[0] = grad_in
        want_b = ctx.has_bias and need_b
        if need_w or want_b:
            grad_w, grad_b = torch.ops.groupnet.grouped_conv2d_backward_weight(
                conv_input, grad_out, relu_output, list(weight.shape), want_b, stride, padding, dilation, groups,
                ctx.w_channels_last, ctx.input_precision,
            )  # fmt: skip
            grads[1] = grad_w if need_w else None
            grads[2] = grad_b if want_b else None
        if need_residual:
            grads[5] = grad_out if relu_output is None else torch.where(relu_output > 0, grad_out, 0.0)
        return tuple(grads)


def run_grouped_conv2d_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    branches: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    activation: str | None = None,
    pre_scale: Tensor | None = None,
    pre_shift: Tensor | None = None,
    residual: Tensor | None = None,
    input_precision: str | None = None,
) -> Tensor:
    """``act(conv2d(relu(x * pre_scale + pre_shift) or x, weight, bias) + residual)`` on validated arguments.

    The caller (``groupnet.ops``) has checked shapes, K, groups and pairs of ints; ``pre_scale``/``pre_shift`` are
    ``(K*Cin,)`` in float32 (float64 for float64 x), ``residual`` has the output's size and x's dtype. The launcher
    checks what protects memory.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_conv2d_fused: activation must be one of {ACTIVATIONS}, got {activation!r}")
    precision = default_input_precision("conv") if input_precision is None else input_precision
    check_input_precision("grouped_conv2d_fused", precision)
    return GroupedConv2dFusedFunction.apply(
        x, weight, bias, pre_scale, pre_shift, residual, list(stride), list(padding), list(dilation),
        branches * groups, activation, precision,
    )  # fmt: skip


def compile_specs() -> list[CompileSpec]:
    """The forward with every fusion on (affine + ReLU prologue, bias, residual, ReLU epilogue) for the configs the
    prologue launches tune over: the forward's specs with fp32 scale/shift pointers and a residual of the activations'
    dtype."""
    from .grouped_conv2d_fwd import fwd_compile_specs

    specs = []
    tuned = {(*(c.kwargs[b] for b in MNK_BLOCKS), c.num_warps, c.num_stages) for c in PROLOGUE_FWD_CONFIGS}
    for spec in fwd_compile_specs():
        if (*(spec.constexprs[b] for b in MNK_BLOCKS), spec.num_warps, spec.num_stages) not in tuned:
            continue  # a config the prologue launches never tune over
        signature = {**spec.signature, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "r_ptr": spec.signature["y_ptr"]}
        constexprs = {**spec.constexprs, "PRE_AFFINE_RELU": True, "HAS_RESIDUAL": True, "sr_c": 1}
        signature.update({name: "constexpr" for name in ("PRE_AFFINE_RELU", "HAS_RESIDUAL", "sr_c")})
        name = spec.name.replace("grouped_conv2d_fwd", "grouped_conv2d_fwd_fused", 1)
        specs.append(replace(spec, name=name, signature=signature, constexprs=constexprs))
    return specs
