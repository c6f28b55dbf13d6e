"""Grouped conv2d forward as an implicit GEMM: ``y = act(conv(x, w) + b)`` for G groups at once.

Per group g: GEMM rows M = N*OH*OW output pixels, columns Cout_g, reduction Cin_g*KH*KW, walked tap by tap
(kh, kw) and BLOCK_K input channels at a time. Every tensor is addressed through its own strides, so NCHW,
channels_last and strided views work without copies (channels_last makes the channel loads contiguous).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import CompileSpec, autotune_configs
from ._grouped_conv2d_common import (
    GPU_DOT_SETTINGS,
    ConvGeometry,
    check_launch_tensors,
    check_out,
    conv_compile_spec,
    dot_settings,
    launch,
)

ACTIVATIONS = (None, "relu")

FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
# Small blocks: the interpreter runs programs one by one, and small tiles exercise multi-tile tails on tiny tests.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)


@triton.jit
def _grouped_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, H, W, OH, OW, CIN_G, COUT_G, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels) x (BLOCK_N output channels) tile of group ``program_id(1)``.

    x: (N, G*CIN_G, H, W), w: (G*COUT_G, CIN_G, KH, KW), b: (G*COUT_G,), y: (N, G*COUT_G, OH, OW), all strided.
    M = N*OH*OW (< 2**31); grid = (cdiv(M, BLOCK_M) * cdiv(COUT_G, BLOCK_N), G).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    # Column tiles vary fastest so the programs sharing one input tile run together (it stays in L2).
    tiles_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < COUT_G
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = (offs_m // (OW * OH)).to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    x_rows = x_ptr + n * sx_n + g * CIN_G * sx_c  # [BLOCK_M] pointers to channel 0 of the group
    w_cols = w_ptr + (g * COUT_G + offs_n) * sw_o  # [BLOCK_N] pointers to weight rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    k_blocks = tl.cdiv(CIN_G, BLOCK_K)
    # One flat loop over (tap, channel block) so the compiler can pipeline loads across taps.
    for it in range(0, KH * KW * k_blocks):
        tap = it // k_blocks
        ci = (it - tap * k_blocks) * BLOCK_K + offs_k
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        mask_k = ci < CIN_G
        x_off = ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        x = tl.load(
            x_rows[:, None] + x_off[:, None] + ci.to(tl.int64)[None, :] * sx_c,
            mask=row_ok[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_cols[None, :] + ci.to(tl.int64)[:, None] * sw_i + kh * sw_h + kw * sw_w,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(b_ptr + g * COUT_G + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    y_off = n * sy_n + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w
    y_ptrs = y_ptr + y_off[:, None] + ((g * COUT_G + offs_n) * sy_c)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_grouped_conv2d_fwd_autotuned = triton.autotune(
    configs=autotune_configs(FWD_CONFIGS, INTERPRETER_CONFIG),
    key=["CIN_G", "COUT_G", "KH", "KW", "OH", "OW", "stride_h", "stride_w", "sx_c", "ACTIVATION"],
)(_grouped_conv2d_fwd_kernel)


def grouped_conv2d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    activation: str | None = None,
    input_precision: str = "ieee",
    config: triton.Config | None = None,
) -> Tensor:
    """Write ``act(conv2d(x, weight, bias, groups=groups))`` into ``out`` (any strides) and return it.

    ``groups`` is G = branches * inner groups; ``input_precision`` ("ieee"/"tf32") applies to fp32 dots on a GPU;
    ``config`` launches one fixed config instead of autotuning.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_launch_tensors("grouped_conv2d_fwd", x.dtype, x=x, weight=weight, bias=bias, out=out)
    geom = ConvGeometry.of(x.shape, weight.shape, stride, padding, dilation, groups)
    check_out("grouped_conv2d_fwd", out, geom.output_size, x.dtype, x.device)
    if bias is not None and tuple(bias.shape) != (groups * geom.cout_g,):
        raise ValueError(f"grouped_conv2d_fwd: bias must be ({groups * geom.cout_g},), got {tuple(bias.shape)}")
    m = geom.n * geom.oh * geom.ow
    if m == 0:
        return out
    if m >= 2**31:
        raise ValueError(f"grouped_conv2d_fwd: N*OH*OW = {m} output pixels exceeds the int32 pixel index")

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(geom.cout_g, meta["BLOCK_N"]), groups)

    args = (
        x, weight, bias if bias is not None else weight, out,
        m, geom.h, geom.w, geom.oh, geom.ow, geom.cin_g, geom.cout_g, geom.kh, geom.kw,
        *geom.conv_args(),
        *x.stride(), *weight.stride(), *out.stride(),
    )  # fmt: skip
    constexprs = {"HAS_BIAS": bias is not None, "ACTIVATION": activation, **dot_settings(x.dtype, input_precision)}
    launch(_grouped_conv2d_fwd_autotuned, grid, args, constexprs, config)
    return out


def fwd_compile_specs() -> list[CompileSpec]:
    """The forward (bias + ReLU epilogue) for every GPU config and dtype, channels_last x/y and weight."""
    return [
        conv_compile_spec(
            "fwd",
            _grouped_conv2d_fwd_kernel,
            dtype,
            config,
            pointers={name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")},
            unit_strides=("sx_c", "sw_i", "sy_c"),
            flags={"HAS_BIAS": True, "ACTIVATION": "relu"},
        )
        for config in FWD_CONFIGS
        for dtype in GPU_DOT_SETTINGS
    ]
