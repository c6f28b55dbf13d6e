"""Grouped conv2d with Triton: the public op, its autograd, the compile specs and the roofline cases.

The three passes live in their own files (``grouped_conv2d_fwd``, ``grouped_conv2d_bwd_input``,
``grouped_conv2d_bwd_weight``). Glue: one ``torch.library.custom_op`` per launcher
(``groupnet::grouped_conv2d_forward``, ``..._backward_input``, ``..._backward_weight``), each with a fake whose
strides match the real output, and an outer ``torch.autograd.Function`` calling them. Memory formats: the output
and the input gradient take the input's format (channels_last or contiguous), the weight gradient the weight's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from groupnet import _checks

from . import _launch_shapes
from ._common import (
    CompileSpec,
    LaunchCase,
    check_input_precision,
    default_input_precision,
    register_autocast_rule,
    specs_from_launches,
)
from ._grouped_conv2d_common import ConvGeometry
from .grouped_conv2d_bwd_input import grouped_conv2d_bwd_input
from .grouped_conv2d_bwd_weight import grouped_conv2d_bwd_weight
from .grouped_conv2d_fwd import ACTIVATIONS, grouped_conv2d_fwd


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


register_autocast_rule("groupnet::grouped_conv2d_forward")


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

    The entry for direct callers: it validates every argument, then runs :func:`run_grouped_conv2d`
    (``groupnet.ops.grouped_conv2d`` validates once itself and calls that directly).

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

    Under ``torch.autocast`` the operands are cast as for ``nn.Conv2d`` (``_checks.autocast_inputs``).
    """
    if isinstance(x, Tensor):
        x, weight, bias = _checks.autocast_inputs(x.device.type, x, weight, bias)
    _checks.check_conv_args(x, weight, bias, branches=branches, groups=groups)
    stride, padding, dilation = (
        _checks.pair(v, f"grouped_conv2d: {name}")
        for v, name in ((stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    )
    return run_grouped_conv2d(x, weight, bias, branches=branches, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, activation=activation, input_precision=input_precision)


def run_grouped_conv2d(
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
    input_precision: str | None = None,
) -> Tensor:
    """:func:`grouped_conv2d` on arguments the caller has validated (shapes, K, groups, pairs of ints).

    Only the kernel options are checked here; each pass launcher checks what protects memory (dtypes, devices,
    sizes against the buffers, int32 index ranges).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_conv2d: activation must be one of {ACTIVATIONS}, got {activation!r}")
    precision = default_input_precision("conv") if input_precision is None else input_precision
    check_input_precision("grouped_conv2d", precision)
    g = branches * groups
    return GroupedConv2dFunction.apply(
        x, weight, bias, list(stride), list(padding), list(dilation), g, activation, precision
    )


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _conv_launch_cases(shape: _launch_shapes.ConvShape, dtype: str, precision: str, layout: str,
                       epilogue: bool = False) -> list[LaunchCase]:
    """The passes one conv of a training step launches, run through the custom ops' own bodies on meta tensors:
    forward, input gradient (not for the stem, whose input needs none) and weight gradient. ``epilogue``: the
    bias + ReLU variant (the fused epilogue and the backward's ReLU mask)."""
    k, stem = shape.branches, shape.cin == 3
    fmt = _memory_format(layout == "channels_last")
    t = _TORCH_DTYPES[dtype]
    pad, stride = shape.kernel // 2, shape.stride
    out_size = (shape.size + 2 * pad - shape.kernel) // stride + 1
    conv = ([stride, stride], [pad, pad], [1, 1], k)

    def new(*size):
        return torch.empty(size, dtype=t, device="meta").contiguous(memory_format=fmt)

    x = new(_launch_shapes.BATCH, k * shape.cin, shape.size, shape.size)
    w = new(k * shape.cout, shape.cin, shape.kernel, shape.kernel)
    b = torch.empty(k * shape.cout, dtype=t, device="meta") if epilogue else None
    y = new(_launch_shapes.BATCH, k * shape.cout, out_size, out_size)
    relu = y if epilogue else None
    cl = layout == "channels_last"
    variant = f"{dtype}{'_' + precision if dtype == 'fp32' else ''} {layout}"
    where = (f"{shape.model}/K{k} {shape.cin}->{shape.cout} k{shape.kernel}s{stride} {shape.size}px"
             + (" bias+relu" if epilogue else ""))
    runs = {
        "fwd": lambda: grouped_conv2d_forward._init_fn(x, w, b, *conv, "relu" if epilogue else None, precision),
        "bwd_input": lambda: grouped_conv2d_backward_input._init_fn(
            y, w, relu, list(x.shape), *conv, cl, precision),
        "bwd_weight": lambda: grouped_conv2d_backward_weight._init_fn(
            x, y, relu, list(w.shape), epilogue, *conv, cl, precision),
    }
    if stem:
        del runs["bwd_input"]
    return [LaunchCase(f"{p} {variant} {where}", p, run, variant.split()[0], layout) for p, run in runs.items()]


def launch_cases() -> list[LaunchCase]:
    """Every pass of every conv of the split WRN-28-10 and ResNet-56 (``kernels/_launch_shapes.py``) x dtype
    variant x layout, plus the bias + ReLU epilogue on one WRN layer."""
    cases = []
    for dtype, precision in _launch_shapes.DTYPE_VARIANTS:
        for layout in _launch_shapes.LAYOUTS:
            for shape in _launch_shapes.CONV_SHAPES:
                cases += _conv_launch_cases(shape, dtype, precision, layout)
            cases += _conv_launch_cases(_launch_shapes.CONV_SHAPES[2], dtype, precision, layout, epilogue=True)
    return cases


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """The distinct JIT specializations x autotune configs of :func:`launch_cases` (kernels/report.py)."""
    return specs_from_launches("grouped_conv2d", launch_cases())


class ConvWorkload(NamedTuple):
    """One conv launch shape for the roofline estimates: sizes per branch, a square input, padding ``kernel // 2``."""

    name: str
    branches: int
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int  # input height = width
    batch: int


def roofline_cases(workloads: Sequence[ConvWorkload]) -> list[dict]:
    """FLOPs and minimum HBM bytes of each pass of each workload, bf16, channels_last.

    Protocol of kernels/report.py: name, flops (2 per multiply-add), bytes (every operand read once, every result
    written once; the weight gradient's split-K partial buffer is not counted), dtype, notes. Which shapes to
    estimate is the caller's choice (``python -m groupnet.roofline`` takes them from the model zoo).
    """
    size = 2  # bf16
    cases = []
    for w in workloads:
        out_hw = (w.size + 2 * (w.kernel // 2) - w.kernel) // w.stride + 1
        x_el = w.batch * w.branches * w.cin * w.size * w.size
        y_el = w.batch * w.branches * w.cout * out_hw * out_hw
        w_el = w.branches * w.cout * w.cin * w.kernel * w.kernel
        flops = 2 * w.batch * out_hw * out_hw * w.branches * w.cout * w.cin * w.kernel * w.kernel
        for pass_name in ("fwd", "bwd_input", "bwd_weight"):
            cases.append(
                {
                    "name": f"conv {pass_name} K={w.branches} {w.name} {w.cin}->{w.cout} k{w.kernel}s{w.stride} "
                    f"{w.size}px",
                    "flops": float(flops),
                    "bytes": float((x_el + y_el + w_el) * size),
                    "dtype": "bf16",
                    "notes": f"batch {w.batch}, channels_last",
                }
            )
    return cases
