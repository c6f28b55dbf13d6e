"""Grouped conv2d input gradient as an implicit GEMM, with stride and flip folded into the index math.

dx[n, ci, ih, iw] = sum over (co, kh, kw) of dy[n, co, oh, ow] * w[co, ci, kh, kw], where oh = (ih + pad_h -
kh*dil_h) / stride_h must divide exactly (same for the width). No zero insertion, no flipped weight copy.

Input pixels are split into stride_h*stride_w phases (ih % stride_h, iw % stride_w). Within one phase the taps whose
division is exact are the same for every pixel: kh*dil_h = ih + pad_h (mod stride_h) holds for kh = kh0 + j*step_h
with step_h = stride_h / gcd(stride_h, dil_h). A program therefore owns pixels of one phase and loops only over
its contributing taps, so a stride-2 conv does no wasted multiply-adds.

An optional ReLU output mask is fused: with RELU_GRAD the gradient is taken as dy * (y > 0).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from . import _grouped_conv2d_common as common
from . import grouped_conv2d_tma as _tma
from ._common import autotune_configs, check_launch_tensors, launch
from ._grouped_conv2d_common import block_range, pixel_coords, store_pixel_tile, tile_of

# 128-row tiles use 8 warps: with 4 the fp32 (tf32) variant spills registers on sm_80. The range of tiles is the
# forward's (see FWD_CONFIGS) with reduction blocks of at most 32 (16 for 256-row tiles): the dy and ReLU-mask tiles
# pass through registers, and deeper blocks took fp32 to 247-255 registers with spills; every config stays within
# 232 registers without spills.
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
BWD_INPUT_CONFIGS = common.tile_configs(
    common.MNK_BLOCKS,
    [
        (128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 32, 32, 4, 4),
        (256, 64, 16, 8, 4), (64, 256, 32, 8, 3), (128, 128, 16, 8, 4), (128, 16, 16, 4, 4),
    ],
)  # fmt: skip
INTERPRETER_CONFIG = common.MNK_INTERPRETER_CONFIG


@triton.jit
def _first_tap(c, stride, dil, STEP, K):
    """Smallest tap t in [0, STEP) with t*dil = c (mod stride), or K when no tap of this phase contributes."""
    t0 = tl.zeros((), tl.int32) + K  # a tensor even when K is specialized to a constant
    for t in range(0, STEP):
        t0 = tl.where((c - t * dil) % stride == 0, t, t0)
    return t0


@triton.jit
def _grouped_conv2d_bwd_input_kernel(
    dy_ptr, w_ptr, y_ptr, dx_ptr,
    MQ, HQ, WQ, H, W, OH, OW, CIN_G, COUT_G, G, KH: tl.constexpr, KW: tl.constexpr,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, STEP_H, STEP_W,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    RELU_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CH_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M input pixels of one phase) x (BLOCK_N input channels) tile of dx for group ``program_id(2)``.

    dy, y: (N, G*COUT_G, OH, OW); w: (G*COUT_G, CIN_G, KH, KW); dx: (N, G*CIN_G, H, W); all strided.
    HQ = cdiv(H, stride_h), WQ = cdiv(W, stride_w), MQ = N*HQ*WQ pixels per phase;
    grid = (cdiv(MQ, BLOCK_M) * cdiv(CIN_G, BLOCK_N), stride_h*stride_w, G). G only keys the autotuner.
    The loop walks (tap, channel block) with counters, not a division per iteration.
    CH_ALIGN: a power of two dividing the channel counts and the strides over channel rows (see the forward kernel).
    """
    CIN_G = CIN_G // CH_ALIGN * CH_ALIGN
    COUT_G = COUT_G // CH_ALIGN * CH_ALIGN
    sdy_n = sdy_n // CH_ALIGN * CH_ALIGN
    sdy_h = sdy_h // CH_ALIGN * CH_ALIGN
    sdy_w = sdy_w // CH_ALIGN * CH_ALIGN
    sw_o = sw_o // CH_ALIGN * CH_ALIGN
    sw_h = sw_h // CH_ALIGN * CH_ALIGN
    sw_w = sw_w // CH_ALIGN * CH_ALIGN
    sy_n = sy_n // CH_ALIGN * CH_ALIGN
    sy_h = sy_h // CH_ALIGN * CH_ALIGN
    sy_w = sy_w // CH_ALIGN * CH_ALIGN
    pid_m, pid_n = tile_of(tl.program_id(0), CIN_G, BLOCK_N)
    phase = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    phase_h = phase // stride_w
    phase_w = phase % stride_w

    offs_m, in_phase = block_range(pid_m, MQ, BLOCK_M)
    offs_n, mask_n = block_range(pid_n, CIN_G, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n, qh, qw = pixel_coords(offs_m, HQ, WQ)
    ih = phase_h + qh * stride_h
    iw = phase_w + qw * stride_w
    mask_m = in_phase & (ih < H) & (iw < W)

    # Contributing taps of this phase: kh = kh0 + j*STEP_H, j < n_kh; oh = qh + (c_h - kh*dil_h) / stride_h.
    c_h = phase_h + pad_h
    c_w = phase_w + pad_w
    kh0 = _first_tap(c_h, stride_h, dil_h, STEP_H, KH)
    kw0 = _first_tap(c_w, stride_w, dil_w, STEP_W, KW)
    n_kh = (KH - kh0 + STEP_H - 1) // STEP_H
    n_kw = (KW - kw0 + STEP_W - 1) // STEP_W

    dy_rows = dy_ptr + n * sdy_n + g * COUT_G * sdy_c
    y_rows = y_ptr + n * sy_n + g * COUT_G * sy_c
    w_cols = w_ptr + (g * COUT_G) * sw_o + offs_n.to(tl.int64) * sw_i
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    k_blocks = tl.cdiv(COUT_G, BLOCK_K)
    # Loop counters: channel block cb fastest, then tap column jw, then tap row jh (the tap count of a phase is
    # not a constant, so they are stepped rather than divided out of the iteration number).
    cb = tl.zeros((), tl.int32)
    jw = tl.zeros((), tl.int32)
    jh = tl.zeros((), tl.int32)
    for _ in range(0, n_kh * n_kw * k_blocks):
        co = cb * BLOCK_K + offs_k
        kh = kh0 + jh * STEP_H
        kw = kw0 + jw * STEP_W
        # (c - k*dil) is an exact multiple of the stride here, so truncating and flooring division agree.
        oh = qh + (c_h - kh * dil_h) // stride_h
        ow = qw + (c_w - kw * dil_w) // stride_w
        row_ok = mask_m & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        mask_k = co < COUT_G
        tile_ok = row_ok[:, None] & mask_k[None, :]
        co64 = co.to(tl.int64)
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        dy = tl.load(
            dy_rows[:, None] + (oh64 * sdy_h + ow64 * sdy_w)[:, None] + co64[None, :] * sdy_c,
            mask=tile_ok,
            other=0.0,
        ).to(DOT_DTYPE)
        if RELU_GRAD:
            # An independent load and a select (not a load masked by y > 0), so both loads can be pipelined.
            y = tl.load(
                y_rows[:, None] + (oh64 * sy_h + ow64 * sy_w)[:, None] + co64[None, :] * sy_c,
                mask=tile_ok,
                other=0.0,
            )
            dy = tl.where(y.to(tl.float32) > 0.0, dy, 0.0)
        w = tl.load(
            w_cols[None, :] + co64[:, None] * sw_o + kh * sw_h + kw * sw_w,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(dy, w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        cb += 1
        next_tap = cb == k_blocks
        cb = tl.where(next_tap, 0, cb)
        jw = tl.where(next_tap, jw + 1, jw)
        next_row = jw == n_kw
        jw = tl.where(next_row, 0, jw)
        jh = tl.where(next_row, jh + 1, jh)

    store_pixel_tile(dx_ptr, acc, n, ih, iw, g * CIN_G + offs_n, sdx_n, sdx_c, sdx_h, sdx_w, mask_m, mask_n)


_grouped_conv2d_bwd_input_autotuned = triton.autotune(
    configs=autotune_configs(BWD_INPUT_CONFIGS, INTERPRETER_CONFIG),
    # triton adds the tensors' dtypes to the key; DOT_DTYPE and INPUT_PRECISION tell fp32 from tf32 dots.
    key=["G", "CIN_G", "COUT_G", "KH", "KW", "H", "W", "stride_h", "stride_w", "dil_h", "dil_w", "sdx_c",
         "RELU_GRAD", "DOT_DTYPE", "INPUT_PRECISION", "CH_ALIGN"],
    prune_configs_by={"early_config_prune": common.prune_oversized(common.MNK_BLOCKS, (None, "CIN_G", "COUT_G"))},
    cache_results=True,
)(_grouped_conv2d_bwd_input_kernel)


def grouped_conv2d_bwd_input(
    grad_out: Tensor,
    weight: Tensor,
    out: Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    relu_output: Tensor | None = None,
    input_precision: str = "ieee",
    config: triton.Config | None = None,
    tma: bool | None = None,
) -> Tensor:
    """Write the input gradient of ``conv2d(x, weight, groups=groups)`` into ``out`` (shaped like x) and return it.

    ``grad_out`` may have any strides, including the stride 0 of an expanded gradient. With ``relu_output`` (the
    forward output of a conv with ReLU epilogue) the gradient is masked by ``relu_output > 0`` first. ``config``
    launches one fixed config; without it, under ``torch.use_deterministic_algorithms(True)`` the shape's pinned
    config runs (``common.pinned_config``), otherwise the autotuner picks. ``tma``: True runs the sm_90 TMA kernel
    (``grouped_conv2d_tma.py``; an error when the operands do not qualify), False the cp.async kernel, None the TMA
    kernel on a CUDA device of capability >= 9 when the operands qualify (stride 1, channels_last, 16-byte rules)
    and no fixed ``config`` is given (a config names one kernel's tiles).
    """
    check_launch_tensors(
        "grouped_conv2d_bwd_input", grad_out.dtype, grad_out=grad_out, weight=weight, out=out, relu_output=relu_output
    )
    geom = common.ConvGeometry.of(out.shape, weight.shape, stride, padding, dilation, groups)
    common.check_output_shaped("grouped_conv2d_bwd_input", geom, grad_out=grad_out, relu_output=relu_output)
    common.check_out("grouped_conv2d_bwd_input", out, geom.input_size, grad_out.dtype, grad_out.device)
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    hq, wq = triton.cdiv(geom.h, sh), triton.cdiv(geom.w, sw)
    mq = geom.n * hq * wq
    if mq == 0:
        return out
    common.check_int32_pixels("grouped_conv2d_bwd_input", mq, f"{mq} input pixels per phase")
    grad_out, weight, relu_output = (common.channels_contiguous(t) for t in (grad_out, weight, relu_output))
    target, out = out, common.channels_contiguous_output(out)
    why_not = _tma.why_not_tma(geom, "bwd_input", input_precision, grad_out=grad_out, weight=weight,
                               relu_output=relu_output)
    tma = _tma.choose("grouped_conv2d_bwd_input", tma, why_not, config, grad_out.device)
    if tma:
        _tma.grouped_conv2d_bwd_input_tma(grad_out, weight, out, geom, relu_output=relu_output,
                                          input_precision=input_precision, config=config)
        return common.finish_output(target, out)

    def grid(meta):
        return (triton.cdiv(mq, meta["BLOCK_M"]) * triton.cdiv(geom.cin_g, meta["BLOCK_N"]), sh * sw, groups)

    y = relu_output if relu_output is not None else grad_out
    w_strides = common.weight_strides(weight.stride(), weight.shape[2:])
    args = (
        grad_out, weight, y, out,
        mq, hq, wq, geom.h, geom.w, geom.oh, geom.ow, geom.cin_g, geom.cout_g, groups, geom.kh, geom.kw,
        *geom.conv_args(), sh // math.gcd(sh, dh), sw // math.gcd(sw, dw),
        *grad_out.stride(), *w_strides, *y.stride(), *out.stride(),
    )  # fmt: skip
    constexprs = {"RELU_GRAD": relu_output is not None, **common.dot_settings(grad_out.dtype, input_precision),
                  "CH_ALIGN": common.channel_alignment(geom.cin_g, geom.cout_g, *w_strides[::2], w_strides[3], *(
                      t.stride(d) for t in (grad_out, y) for d in (0, 2, 3)))}
    if config is None and common.configs_pinned():
        configs = common.within_register_budget(
            autotune_configs(BWD_INPUT_CONFIGS, INTERPRETER_CONFIG), common.MNK_BLOCKS, constexprs)
        config = common.pinned_config(configs, common.MNK_BLOCKS, (mq, geom.cin_g, geom.cout_g))
    launch(_grouped_conv2d_bwd_input_autotuned, grid, args, constexprs, config)
    return common.finish_output(target, out)
