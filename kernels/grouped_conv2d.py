"""Grouped conv2d with Triton: the public op, its autograd, the compile specs and the roofline cases.

The three passes live in their own files (``grouped_conv2d_fwd``, ``grouped_conv2d_bwd_input``,
``grouped_conv2d_bwd_weight``). Glue: one ``torch.library.custom_op`` per launcher
(``groupnet::grouped_conv2d_forward``, ``..._backward_input``, ``..._backward_weight``), each with a fake whose
strides match the real output, and an outer ``torch.autograd.Function`` calling them. Memory formats: the output
and the input gradient take the input's format (channels_last or contiguous), the weight gradient the weight's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from groupnet import _checks
from groupnet.functional import _pair  # functional imports groupnet.kernels lazily: no import cycle

from ._common import CompileSpec
from ._grouped_conv2d_common import (
    INPUT_PRECISIONS,
    ConvGeometry,
    check_launch_tensors,
    default_input_precision,
)
from .grouped_conv2d_bwd_input import bwd_input_compile_specs, grouped_conv2d_bwd_input
from .grouped_conv2d_bwd_weight import bwd_weight_compile_specs, grouped_conv2d_bwd_weight
from .grouped_conv2d_fwd import ACTIVATIONS, fwd_compile_specs, grouped_conv2d_fwd


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _geometry(input_size, weight_size, stride, padding, dilation, groups) -> ConvGeometry:
    sizes = (tuple(input_size), tuple(weight_size))
    return ConvGeometry.of(*sizes, tuple(stride), tuple(padding), tuple(dilation), groups)


def _new_output(size: tuple[int, ...], like: Tensor, channels_last: bool) -> Tensor:
    """An uninitialized tensor of ``size`` with ``like``'s dtype and device, channels_last or contiguous."""
    return torch.empty(size, dtype=like.dtype, device=like.device, memory_format=_memory_format(channels_last))


def _launch_kwargs(geom: ConvGeometry, input_precision: str) -> dict:
    """The keyword arguments every pass launcher takes: conv parameters, groups and input precision."""
    return dict(
        stride=geom.stride,
        padding=geom.padding,
        dilation=geom.dilation,
        groups=geom.groups,
        input_precision=input_precision,
    )


@torch.library.custom_op("groupnet::grouped_conv2d_forward", mutates_args=())
def grouped_conv2d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str | None,
    input_precision: str,
) -> Tensor:
    """``act(conv2d(x, weight, bias, groups=groups))`` as a new tensor in x's memory format."""
    geom = _geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    out = _new_output(geom.output_size, x, _checks.is_channels_last(x))
    return grouped_conv2d_fwd(x, weight, bias, out, activation=activation, **_launch_kwargs(geom, input_precision))


@grouped_conv2d_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, input_precision):
    geom = _geometry(x.shape, weight.shape, stride, padding, dilation, groups)
    fmt = _memory_format(_checks.is_channels_last(x))
    return x.new_empty(geom.output_size).contiguous(memory_format=fmt)


@torch.library.custom_op("groupnet::grouped_conv2d_backward_input", mutates_args=())
def grouped_conv2d_backward_input(
    grad_out: Tensor,
    weight: Tensor,
    relu_output: Tensor | None,
    input_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    channels_last: bool,
    input_precision: str,
) -> Tensor:
    """The input gradient (``input_size``, channels_last or contiguous); grad_out may have any strides."""
    geom = _geometry(input_size, weight.shape, stride, padding, dilation, groups)
    out = _new_output(geom.input_size, grad_out, channels_last)
    return grouped_conv2d_bwd_input(
        grad_out, weight, out, relu_output=relu_output, **_launch_kwargs(geom, input_precision)
    )


@grouped_conv2d_backward_input.register_fake
def _(grad_out, weight, relu_output, input_size, stride, padding, dilation, groups, channels_last, input_precision):
    return grad_out.new_empty(tuple(input_size)).contiguous(memory_format=_memory_format(channels_last))


@torch.library.custom_op("groupnet::grouped_conv2d_backward_weight", mutates_args=())
def grouped_conv2d_backward_weight(
    x: Tensor,
    grad_out: Tensor,
    relu_output: Tensor | None,
    weight_size: list[int],
    has_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    channels_last: bool,
    input_precision: str,
) -> tuple[Tensor, Tensor]:
    """``(grad_weight, grad_bias)``; grad_weight in the weight's format, grad_bias empty ``(0,)`` without bias."""
    geom = _geometry(x.shape, weight_size, stride, padding, dilation, groups)
    grad_w = _new_output(geom.weight_size, x, channels_last)
    grad_b = x.new_empty((groups * geom.cout_g,) if has_bias else (0,))
    grouped_conv2d_bwd_weight(
        x,
        grad_out,
        grad_w,
        grad_b if has_bias else None,
        relu_output=relu_output,
        **_launch_kwargs(geom, input_precision),
    )
    return grad_w, grad_b


@grouped_conv2d_backward_weight.register_fake
def _(x, grad_out, relu_output, weight_size, has_bias, stride, padding, dilation, groups, channels_last,
      input_precision):  # fmt: skip
    grad_w = x.new_empty(tuple(weight_size)).contiguous(memory_format=_memory_format(channels_last))
    return grad_w, x.new_empty((weight_size[0],) if has_bias else (0,))


class GroupedConv2dFunction(torch.autograd.Function):
    """Autograd for :func:`grouped_conv2d` over the three custom ops (first derivatives only)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups, activation, input_precision):
        return torch.ops.groupnet.grouped_conv2d_forward(
            x, weight, bias, stride, padding, dilation, groups, activation, input_precision
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, stride, padding, dilation, groups, activation, input_precision = inputs
        # With the ReLU epilogue the backward needs the output's sign (y > 0 exactly where the pre-activation is).
        ctx.save_for_backward(x, weight, output if activation == "relu" else None)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.input_precision = input_precision
        ctx.x_channels_last = _checks.is_channels_last(x)
        ctx.w_channels_last = _checks.is_channels_last(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, relu_output = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.groupnet.grouped_conv2d_backward_input(
                grad_out, weight, relu_output, list(x.shape), stride, padding, dilation, groups,
                ctx.x_channels_last, ctx.input_precision,
            )  # fmt: skip
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] or want_b:
            grad_w, grad_b = torch.ops.groupnet.grouped_conv2d_backward_weight(
                x, grad_out, relu_output, list(weight.shape), want_b, stride, padding, dilation, groups,
                ctx.w_channels_last, ctx.input_precision,
            )  # fmt: skip
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if want_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def grouped_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    branches: int,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: str | None = None,
    input_precision: str | None = None,
) -> Tensor:
    """K independent 2-d convolutions of a channel-stacked input with the Triton implicit-GEMM kernels.

    Args:
        x: ``(N, K*Cin, H, W)``, NCHW, channels_last or any strided view; branch k reads channels
            ``[k*Cin, (k+1)*Cin)``.
        weight: ``(K*Cout, Cin/groups, kh, kw)``, the weight of ``nn.Conv2d(K*Cin, K*Cout, groups=K*groups)``.
        bias: ``(K*Cout,)`` or None.
        branches: K. groups: inner groups per branch (ResNeXt cardinality).
        activation: None or "relu", fused into the forward epilogue (and its mask into the backward).
        input_precision: "ieee" or "tf32" for fp32 dots on a GPU; None follows ``torch.backends.cudnn.allow_tf32``.

    Returns:
        ``(N, K*Cout, OH, OW)`` in x's memory format (channels_last stays channels_last).
    """
    _checks.check_conv_args(x, weight, bias, branches=branches, groups=groups)
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_conv2d: activation must be one of {ACTIVATIONS}, got {activation!r}")
    precision = default_input_precision() if input_precision is None else input_precision
    if precision not in INPUT_PRECISIONS:
        raise ValueError(f"grouped_conv2d: input_precision must be one of {INPUT_PRECISIONS}, got {precision!r}")
    check_launch_tensors("grouped_conv2d (Triton)", x.dtype, input=x, weight=weight, bias=bias)
    # The custom ops take lists; the error names this op ("grouped_conv2d: stride must be an int or a pair ...").
    stride, padding, dilation = [
        list(_pair(v, f"grouped_conv2d: {name}"))
        for v, name in ((stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    ]
    g = branches * groups
    ConvGeometry.of(x.shape, weight.shape, tuple(stride), tuple(padding), tuple(dilation), g)  # validates sizes
    return GroupedConv2dFunction.apply(x, weight, bias, stride, padding, dilation, g, activation, precision)


def compile_specs() -> list[CompileSpec]:
    """Every pass x every GPU autotune config x {fp32 (tf32), fp16, bf16}, channels_last activations."""
    return fwd_compile_specs() + bwd_input_compile_specs() + bwd_weight_compile_specs()


# Split WRN-28-10 on CIFAR by SplitNet's rule: widen factor int(10/sqrt(K) + 0.4) per branch, stem 16 channels.
_WRN_SPLIT_WIDEN = {2: 7, 4: 5}


def _wrn_convs(widen: int) -> list[tuple[str, int, int, int, int, int]]:
    """The distinct convs of one WRN-28-``widen`` branch: (name, cin, cout, kernel, stride, input size)."""
    c1, c2, c3 = 16 * widen, 32 * widen, 64 * widen
    return [
        ("stem", 3, 16, 3, 1, 32),
        ("g1_conv1_first", 16, c1, 3, 1, 32),
        ("g1_shortcut", 16, c1, 1, 1, 32),
        ("g1_conv", c1, c1, 3, 1, 32),
        ("g2_conv1_first", c1, c2, 3, 2, 32),
        ("g2_shortcut", c1, c2, 1, 2, 32),
        ("g2_conv", c2, c2, 3, 1, 16),
        ("g3_conv1_first", c2, c3, 3, 2, 16),
        ("g3_shortcut", c2, c3, 1, 2, 16),
        ("g3_conv", c3, c3, 3, 1, 8),
    ]


def roofline_cases(batch: int = 128) -> list[dict]:
    """FLOPs and minimum HBM bytes of each pass of every distinct split WRN-28-10 conv (K = 2 and 4), bf16.

    Protocol of kernels/report.py: name, flops (2 per multiply-add), bytes (every operand read once, every result
    written once; the weight gradient's split-K partial buffer is not counted), dtype, notes.
    """
    size = 2  # bf16
    cases = []
    for k, widen in _WRN_SPLIT_WIDEN.items():
        for name, cin, cout, ks, s, hw in _wrn_convs(widen):
            out_hw = (hw + 2 * (ks // 2) - ks) // s + 1
            x_el, y_el = batch * k * cin * hw * hw, batch * k * cout * out_hw * out_hw
            w_el = k * cout * cin * ks * ks
            flops = 2 * batch * out_hw * out_hw * k * cout * cin * ks * ks
            for pass_name in ("fwd", "bwd_input", "bwd_weight"):
                cases.append(
                    {
                        "name": f"conv {pass_name} K={k} {name} {cin}->{cout} k{ks}s{s} {hw}px",
                        "flops": float(flops),
                        "bytes": float((x_el + y_el + w_el) * size),
                        "dtype": "bf16",
                        "notes": f"WRN-28-{widen} per branch, batch {batch}, channels_last",
                    }
                )
    return cases
