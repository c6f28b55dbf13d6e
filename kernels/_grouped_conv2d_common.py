"""Shared pieces of the three grouped conv2d passes: the conv geometry, dot dtypes, and the launch helper.

Each pass (``grouped_conv2d_fwd``, ``grouped_conv2d_bwd_input``, ``grouped_conv2d_bwd_weight``) is one implicit GEMM
over ``G = branches * groups`` independent convolutions of a channel-stacked tensor; group ``g`` owns input channels
``[g*Cin_g, (g+1)*Cin_g)``, output channels and weight rows ``[g*Cout_g, (g+1)*Cout_g)``, exactly like
``nn.Conv2d(groups=G)``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import CompileSpec, is_interpreter

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one grouped conv: batch, spatial, per-group channels, kernel and output size."""

    n: int
    h: int
    w: int
    groups: int  # G, all groups together (branches * inner groups)
    cin_g: int
    cout_g: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(
        cls,
        input_size: tuple[int, ...] | torch.Size,
        weight_size: tuple[int, ...] | torch.Size,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> ConvGeometry:
        n, c, h, w = input_size
        cout, cin_g, kh, kw = weight_size
        if c != groups * cin_g or cout % groups:
            raise ValueError(
                f"grouped conv2d with {groups} groups expects input channels = {groups}*{cin_g} and output channels "
                f"divisible by {groups}, got input {tuple(input_size)} and weight {tuple(weight_size)}"
            )
        for name, pair, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
            if len(pair) != 2 or any(int(v) < low for v in pair):
                raise ValueError(f"grouped conv2d {name} must be two ints >= {low}, got {tuple(pair)}")
        geom = cls(n, h, w, groups, cin_g, cout // groups, kh, kw, tuple(stride), tuple(padding), tuple(dilation))
        if geom.oh < 1 or geom.ow < 1:
            raise ValueError(
                f"grouped conv2d output would be empty: input {h}x{w}, kernel {kh}x{kw}, stride {stride}, "
                f"padding {padding}, dilation {dilation}"
            )
        return geom

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        return (self.n, self.groups * self.cin_g, self.h, self.w)

    @property
    def weight_size(self) -> tuple[int, int, int, int]:
        return (self.groups * self.cout_g, self.cin_g, self.kh, self.kw)

    @property
    def output_size(self) -> tuple[int, int, int, int]:
        return (self.n, self.groups * self.cout_g, self.oh, self.ow)

    def conv_args(self) -> tuple[int, ...]:
        """stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, in the order every kernel takes them."""
        return (*self.stride, *self.padding, *self.dilation)


INPUT_PRECISIONS = ("ieee", "tf32")


def default_input_precision() -> str:
    """PyTorch's own choice for fp32 convolutions: tf32 when ``torch.backends.cudnn.allow_tf32`` (its default)."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def dot_settings(dtype: torch.dtype, input_precision: str) -> dict[str, Any]:
    """Constexprs choosing the ``tl.dot`` operand dtype, accumulator dtype and fp32 input precision.

    16-bit operands stay 16-bit for the tensor cores (fp32 accumulation), except bf16 under the interpreter, which
    cannot do bf16 arithmetic: there they are upcast to fp32 right after the load. ``input_precision`` ("ieee" or
    "tf32") only matters for fp32 dots on a GPU; fp64 (for gradcheck) accumulates in fp64 with "ieee".
    """
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"grouped conv2d input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if dtype == torch.float64:
        return {"DOT_DTYPE": tl.float64, "ACC_DTYPE": tl.float64, "INPUT_PRECISION": "ieee"}
    if dtype == torch.float32:
        return {"DOT_DTYPE": tl.float32, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": input_precision}
    if dtype == torch.float16:
        return {"DOT_DTYPE": tl.float16, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": input_precision}
    if dtype == torch.bfloat16:
        dot = tl.float32 if is_interpreter() else tl.bfloat16
        return {"DOT_DTYPE": dot, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": input_precision}
    raise TypeError(f"grouped conv2d supports dtypes {SUPPORTED_DTYPES}, got {dtype}")


def check_launch_tensors(what: str, dtype: torch.dtype, **tensors: Tensor | None) -> None:
    """All tensors share ``dtype`` and one device the kernels can run on (CUDA, or CPU under the interpreter)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} supports dtypes {SUPPORTED_DTYPES}, got {dtype}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise RuntimeError(f"{what}: all tensors must be on one device, got {devices}")
    if first.type == "cpu" and not is_interpreter():
        raise RuntimeError(f"{what}: CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
    if first.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{what}: expected CUDA tensors (or CPU under TRITON_INTERPRET=1), got {first}")
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}, expected {dtype}")


def check_out(what: str, out: Tensor, size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != tuple(size) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{what}: out must be {tuple(size)} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def launch(kernel, grid, args: tuple, constexprs: dict[str, Any], config: triton.Config | None) -> None:
    """Launch an autotuned kernel, or its raw ``@triton.jit`` function with one fixed ``config``, on the device
    of the first tensor argument (triton launches on the current CUDA device)."""
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if config is None:
            kernel[grid](*args, **constexprs)
        else:
            kernel.fn[grid](
                *args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )


# The dot settings of each dtype on a GPU (fp32 as PyTorch's conv default, tf32), for the offline compile specs.
GPU_DOT_SETTINGS = {
    "fp32": {"DOT_DTYPE": tl.float32, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": "tf32"},
    "fp16": {"DOT_DTYPE": tl.float16, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": "ieee"},
    "bf16": {"DOT_DTYPE": tl.bfloat16, "ACC_DTYPE": tl.float32, "INPUT_PRECISION": "ieee"},
}


@dataclass(frozen=True)
class ConvCompileSpec(CompileSpec):
    """A CompileSpec that also marks int arguments divisible by 16, as the JIT specializes them at run time.

    For channels_last tensors whose per-group channel count is a multiple of 16 (every WRN conv but the stem) the
    strides and channel counts are multiples of 16; telling the compiler so lets it vectorize the channel loads and
    use cp.async for 16-bit operands, which is what the real launches get.
    """

    divisible_ints: tuple[str, ...] = ()

    def attrs(self) -> dict:
        attrs = super().attrs()
        for name in self.divisible_ints:
            attrs[(self.fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        return attrs


def conv_compile_spec(
    pass_name: str,
    fn,
    dtype: str,
    config: triton.Config,
    pointers: dict[str, str],
    unit_strides: tuple[str, ...],
    flags: dict[str, Any],
) -> ConvCompileSpec:
    """The spec of one conv pass on channels_last tensors with channel counts divisible by 16.

    Int arguments are i32; ``unit_strides`` are constexpr 1 (the JIT's specialization of stride 1); the other
    strides and the ``CIN_G``/``COUT_G`` counts are marked divisible by 16. ``pointers`` maps pointer names to
    their element type.
    """
    constexprs = {**flags, **GPU_DOT_SETTINGS[dtype], **config.kwargs, **{name: 1 for name in unit_strides}}
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(pointers)
    signature.update({name: "constexpr" for name in constexprs})
    divisible = tuple(
        name
        for name, ty in signature.items()
        if ty == "i32" and (name in ("CIN_G", "COUT_G") or re.fullmatch(r"s(x|w|y|dy|dx|dw|db)_[a-z]", name))
    )
    blocks = "x".join(str(v) for v in config.kwargs.values())
    return ConvCompileSpec(
        name=f"grouped_conv2d_{pass_name}_{dtype}_{blocks}_w{config.num_warps}_s{config.num_stages}",
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        dot_dtype=dtype if dtype in ("fp16", "bf16") else None,
        divisible_ints=divisible,
    )
