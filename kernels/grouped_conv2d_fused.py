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

import functools

import torch
from torch import Tensor

from groupnet import _checks

from . import _launch_shapes
from ._common import CompileSpec, LaunchCase, check_input_precision, default_input_precision, specs_from_launches
from .grouped_conv2d import _geometry, _launch_kwargs, _memory_format, _new_output
from .grouped_conv2d_fwd import ACTIVATIONS, grouped_conv2d_fwd


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


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fused_launch_case(shape: _launch_shapes.ConvShape, dtype: str, precision: str, layout: str,
                       pattern: str) -> LaunchCase:
    """One fused forward as a block launches it, run through the custom op's body on meta tensors. ``pattern``:
    ``"bn_relu_conv_add"`` (pre-activation block: BN + ReLU on the operand load, the residual on the store) or
    ``"conv_bias_add_relu"`` (a folded BN's bias, the residual and the ReLU in the epilogue, at inference)."""
    k = shape.branches
    fmt = _memory_format(layout == "channels_last")
    t = _TORCH_DTYPES[dtype]
    acc = torch.float32
    pad = shape.kernel // 2
    out_size = (shape.size + 2 * pad - shape.kernel) // shape.stride + 1

    def new(*size, dtype=t):
        return torch.empty(size, dtype=dtype, device="meta").contiguous(memory_format=fmt)

    x = new(_launch_shapes.BATCH, k * shape.cin, shape.size, shape.size)
    w = new(k * shape.cout, shape.cin, shape.kernel, shape.kernel)
    residual = new(_launch_shapes.BATCH, k * shape.cout, out_size, out_size)
    prologue = pattern == "bn_relu_conv_add"
    scale = torch.empty(k * shape.cin, dtype=acc, device="meta") if prologue else None
    shift = torch.empty(k * shape.cin, dtype=acc, device="meta") if prologue else None
    bias = None if prologue else torch.empty(k * shape.cout, dtype=t, device="meta")
    activation = None if prologue else "relu"
    conv = ([shape.stride] * 2, [pad] * 2, [1, 1], k)
    variant = f"{dtype}{'_' + precision if dtype == 'fp32' else ''}"
    label = (f"fwd_fused {pattern} {variant} {layout} {shape.model}/K{k} {shape.cin}->{shape.cout} "
             f"k{shape.kernel}s{shape.stride} {shape.size}px")
    return LaunchCase(
        label, "fwd_fused",
        lambda: grouped_conv2d_fused_forward._init_fn(x, w, bias, scale, shift, residual, *conv, activation,
                                                      precision),
        variant, layout,
    )


def launch_cases() -> list[LaunchCase]:
    """The fused forwards the zoo blocks launch on the Triton backend: the pre-activation pattern on the split
    WRN-28-10's stride-1 3x3 convs and the inference epilogue on ResNet-56's, every dtype variant and layout."""
    cases = []
    for dtype, precision in _launch_shapes.DTYPE_VARIANTS:
        for layout in _launch_shapes.LAYOUTS:
            for shape in _launch_shapes.CONV_SHAPES:
                if shape.kernel != 3 or shape.stride != 1 or shape.cin != shape.cout:
                    continue
                pattern = "bn_relu_conv_add" if shape.model.startswith("wrn") else "conv_bias_add_relu"
                cases.append(_fused_launch_case(shape, dtype, precision, layout, pattern))
    return cases


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """The distinct JIT specializations x autotune configs of :func:`launch_cases` (kernels/report.py)."""
    return specs_from_launches("grouped_conv2d_fused", launch_cases())
