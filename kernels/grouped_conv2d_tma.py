"""Grouped conv2d with TMA loads (sm_90+), stride 1, channels-contiguous operands: all three passes.

The passes are implicit GEMMs whose activation operands are read through device-side tensor descriptors
(``tl.make_tensor_descriptor``) built per group over that group's channels only: shape ``(N, H, W, C_g)``, strides
``(s_n, s_h, s_w, 1)``, base at the group's first channel. With stride 1 the input box of kernel tap ``(kh, kw)`` is
the output box shifted by ``(kh*dil_h - pad_h, kw*dil_w - pad_w)``; TMA fills every element outside the descriptor's
shape with zeros, so the conv's padding, the tile tails and the channel tail past ``C_g`` cost no masks and never
read a neighbouring group's channels (whose values, NaN or not, would otherwise enter the sum as ``0 * x``). The
weight (channels_last: unit stride on its input-channel axis) is read by a second descriptor per group, one tap at
a time. On sm_90 the loads become ``cp.async.bulk.tensor`` (SASS ``UTMALDG``) and the dots asynchronous ``wgmma``.

- forward: ``y = act(conv(x, w) + b + r)``; rows = output pixels as a box of ``(TILE_N images, TILE_H rows, TILE_W
  columns)``, reduction over (input channel block, tap).
- input gradient: for stride 1, ``dx = conv(dy, w flipped and transposed)`` with padding ``dil*(k-1) - pad``: the
  tap ``(kh, kw)`` box of dy is the input box shifted by ``(pad_h - kh*dil_h, pad_w - kw*dil_w)`` and the weight
  tile is read as ``(output channels, input channels)``. ``relu_output`` (the forward's ReLU output) masks dy.
- weight (and bias) gradient: per tap a ``(C_out_g x C_in_g)`` GEMM reduced over row segments of ``SEG_W`` output
  pixels (one image row each, so both boxes stay 2-d tiles in shared memory), split over the grid as the cp.async
  kernel splits its rows, the partials reduced by the launcher in a fixed order.

TMA's rules, checked by :func:`why_not_tma`: stride 1; fp16/bf16, or fp32 as tf32 (fp32 IEEE runs on the FMA units:
the cp.async kernels); activations with unit channel stride, the weight with unit input-channel stride
(channels_last), every other stride and the per-group channel offset a multiple of 16 bytes (per-group channel
counts a multiple of 8 in 16-bit, 4 in fp32), 16-byte-aligned addresses; the weight gradient also output rows of at
least ``MIN_SEGMENT`` pixels. The pass launchers (``grouped_conv2d_fwd.py``, ``grouped_conv2d_bwd_input.py``,
``grouped_conv2d_bwd_weight.py``) pick these kernels on a CUDA device of capability >= 9 when the operands qualify,
else their cp.async kernels. Outputs are stored through masked pointer stores (any strides).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _grouped_conv2d_common as common
from . import _launch_shapes
from ._common import (
    ALLOCATION_ALIGNMENT,
    TORCH_TO_TRITON_DTYPE,
    CompileSpec,
    LaunchCase,
    autotune_configs,
    is_interpreter,
    launch,
    specs_from_launches,
)
from ._grouped_conv2d_common import split_bounds, store_pixel_tile, store_weight_grad_partial, tile_of

TMA_DTYPES = ("fp16", "bf16", "fp32")
"""Operand types of the TMA conv (fp64 runs the cp.async kernel)."""

MAX_SPATIAL_TILE = 64
"""Most output pixels of one image a tile covers (TILE_H * TILE_W); BLOCK_M / (TILE_H * TILE_W) images make a tile."""

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). wgmma wants BLOCK_M a multiple of 64 with 4 warps per 64 rows.
# Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * element bytes. BLOCK_K 16 is for the 16-channel
# layers (a deeper block would be half zero fill); 16-bit gets the deep (64) reduction blocks, fp32 half-size ones.
TMA_CONFIGS_16BIT = common.tile_configs(
    common.MNK_BLOCKS,
    [(128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 16, 8, 4)],
)  # fmt: skip
TMA_CONFIGS_32BIT = common.tile_configs(
    common.MNK_BLOCKS,
    [(128, 64, 32, 8, 3), (64, 64, 32, 4, 4), (64, 128, 32, 4, 3), (128, 64, 16, 8, 4)],
)  # fmt: skip
# Small tiles under the interpreter: a 16-pixel tile spans several images of a tiny test and leaves tails.
(INTERPRETER_CONFIG,) = common.tile_configs(common.MNK_BLOCKS, [(16, 16, 16, 4, 1)])


def tma_configs(dtype: str) -> list[triton.Config]:
    """The GPU configs for an operand type ("fp16", "bf16", "fp32")."""
    return TMA_CONFIGS_32BIT if dtype == "fp32" else TMA_CONFIGS_16BIT


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The operand type's configs (by the weight's dtype), then ``prune_oversized`` on channels."""
    allowed = tma_configs(TORCH_TO_TRITON_DTYPE[named_args["w_ptr"].dtype])
    kept = [c for c in configs if any(c is a for a in allowed)] or configs
    return common.prune_oversized(common.MNK_BLOCKS, (None, "COLS", "RED"))(kept, named_args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _pixel_tile(pid_m, NB, OH, OW, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr):
    """The box origin (image, row, column) of pixel tile ``pid_m`` of an (NB, OH, OW) grid cut into boxes of
    (BLOCK_M / (TILE_H*TILE_W), TILE_H, TILE_W), and each tile row's (n as int64, row, column, in-bounds mask)."""
    TILE_N: tl.constexpr = BLOCK_M // (TILE_H * TILE_W)
    tiles_w = tl.cdiv(OW, TILE_W)
    tiles_h = tl.cdiv(OH, TILE_H)
    tw = pid_m % tiles_w
    th = (pid_m // tiles_w) % tiles_h
    tn = pid_m // (tiles_w * tiles_h)
    n0 = tn * TILE_N
    h0 = th * TILE_H
    w0 = tw * TILE_W
    r = tl.arange(0, BLOCK_M)
    n = n0 + r // (TILE_H * TILE_W)
    h = h0 + (r // TILE_W) % TILE_H
    w = w0 + r % TILE_W
    mask = (n < NB) & (h < OH) & (w < OW)
    return n0, h0, w0, n.to(tl.int64), h, w, mask


@triton.jit
def _step(it, KH: tl.constexpr, KW: tl.constexpr):
    """(channel block, kh, kw) of iteration ``it`` of a flat loop over (channel block, tap), taps fastest; the
    divisors are constexpr."""
    cb = it // (KH * KW)
    tap = it - cb * (KH * KW)
    kh = tap // KW
    return cb, kh, tap - kh * KW


@triton.jit
def _grouped_conv2d_fwd_tma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr,
    NB, H, W, OH, OW, RED, COLS, G, KH: tl.constexpr, KW: tl.constexpr,
    pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_h, sx_w,
    sw_o, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    sr_n, sr_c, sr_h, sr_w,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels) x (BLOCK_N output channels) tile of group ``program_id(1)``, stride 1.

    x: (NB, G*RED, H, W) with channel stride 1; w: (G*COLS, RED, KH, KW) with input-channel stride 1; b: (G*COLS,);
    y, r: (NB, G*COLS, OH, OW), any strides. RED = input channels per group, COLS = output channels per group.
    The pixel tile is a box of BLOCK_M / (TILE_H*TILE_W) images x TILE_H rows x TILE_W columns (powers of two);
    grid = (tiles of the (NB, OH, OW) grid * cdiv(COLS, BLOCK_N), G).
    """
    pid_m, pid_n = tile_of(tl.program_id(0), COLS, BLOCK_N)
    g = tl.program_id(1).to(tl.int64)
    TILE_N: tl.constexpr = BLOCK_M // (TILE_H * TILE_W)
    n0, oh0, ow0, n, oh, ow, mask_m = _pixel_tile(pid_m, NB, OH, OW, TILE_H, TILE_W, BLOCK_M)
    co0 = pid_n * BLOCK_N
    offs_n = co0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COLS

    x_desc = tl.make_tensor_descriptor(
        x_ptr + g * RED, shape=[NB, H, W, RED], strides=[sx_n, sx_h, sx_w, 1],
        block_shape=[TILE_N, TILE_H, TILE_W, BLOCK_K],
    )  # fmt: skip
    w_desc = tl.make_tensor_descriptor(
        w_ptr + g * COLS * sw_o, shape=[COLS, KH, KW, RED], strides=[sw_o, sw_h, sw_w, 1],
        block_shape=[BLOCK_N, 1, 1, BLOCK_K],
    )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # One flat loop over (channel block, tap), taps fastest; the divisors are constexpr.
    for it in range(0, tl.cdiv(RED, BLOCK_K) * (KH * KW)):
        cb, kh, kw = _step(it, KH, KW)
        x = x_desc.load([n0, oh0 + kh * dil_h - pad_h, ow0 + kw * dil_w - pad_w, cb * BLOCK_K])
        w = w_desc.load([co0, kh, kw, cb * BLOCK_K])
        a = tl.reshape(x, (BLOCK_M, BLOCK_K))
        b = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(b_ptr + g * COLS + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if HAS_RESIDUAL:
        r_rows = n * sr_n + oh.to(tl.int64) * sr_h + ow.to(tl.int64) * sr_w
        r = tl.load(r_ptr + r_rows[:, None] + ((g * COLS + offs_n) * sr_c)[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += r.to(ACC_DTYPE)
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    store_pixel_tile(y_ptr, acc, n, oh, ow, g * COLS + offs_n, sy_n, sy_c, sy_h, sy_w, mask_m, mask_n)


@triton.jit
def _grouped_conv2d_bwd_input_tma_kernel(
    dy_ptr, w_ptr, y_ptr, dx_ptr,
    NB, H, W, OH, OW, RED, COLS, G, KH: tl.constexpr, KW: tl.constexpr,
    pad_h, pad_w, dil_h, dil_w,
    sdy_n, sdy_h, sdy_w,
    sw_o, sw_h, sw_w,
    sy_n, sy_h, sy_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    RELU_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M input pixels) x (BLOCK_N input channels) tile of dx for group ``program_id(1)``, stride 1.

    dy, y: (NB, G*RED, OH, OW) with channel stride 1; w: (G*RED, COLS, KH, KW) with stride 1 on its COLS axis;
    dx: (NB, G*COLS, H, W), any strides. RED = output channels per group (the reduction), COLS = input channels
    per group. The pixel tile is a box over (NB, H, W) as in the forward; grid = (tiles * cdiv(COLS, BLOCK_N), G).
    """
    pid_m, pid_n = tile_of(tl.program_id(0), COLS, BLOCK_N)
    g = tl.program_id(1).to(tl.int64)
    TILE_N: tl.constexpr = BLOCK_M // (TILE_H * TILE_W)
    n0, ih0, iw0, n, ih, iw, mask_m = _pixel_tile(pid_m, NB, H, W, TILE_H, TILE_W, BLOCK_M)
    ci0 = pid_n * BLOCK_N
    offs_n = ci0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COLS

    dy_desc = tl.make_tensor_descriptor(
        dy_ptr + g * RED, shape=[NB, OH, OW, RED], strides=[sdy_n, sdy_h, sdy_w, 1],
        block_shape=[TILE_N, TILE_H, TILE_W, BLOCK_K],
    )  # fmt: skip
    if RELU_GRAD:
        y_desc = tl.make_tensor_descriptor(
            y_ptr + g * RED, shape=[NB, OH, OW, RED], strides=[sy_n, sy_h, sy_w, 1],
            block_shape=[TILE_N, TILE_H, TILE_W, BLOCK_K],
        )  # fmt: skip
    w_desc = tl.make_tensor_descriptor(
        w_ptr + g * RED * sw_o, shape=[RED, KH, KW, COLS], strides=[sw_o, sw_h, sw_w, 1],
        block_shape=[BLOCK_K, 1, 1, BLOCK_N],
    )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for it in range(0, tl.cdiv(RED, BLOCK_K) * (KH * KW)):
        cb, kh, kw = _step(it, KH, KW)
        # dx[ih, iw] gathers dy[ih + pad_h - kh*dil_h, iw + pad_w - kw*dil_w] * w[:, :, kh, kw].
        origin = [n0, ih0 + pad_h - kh * dil_h, iw0 + pad_w - kw * dil_w, cb * BLOCK_K]
        a = tl.reshape(dy_desc.load(origin), (BLOCK_M, BLOCK_K)).to(DOT_DTYPE)
        if RELU_GRAD:
            y = tl.reshape(y_desc.load(origin), (BLOCK_M, BLOCK_K))
            a = tl.where(y.to(tl.float32) > 0.0, a, 0.0)
        b = tl.reshape(w_desc.load([cb * BLOCK_K, kh, kw, ci0]), (BLOCK_K, BLOCK_N))
        acc = tl.dot(a, b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    store_pixel_tile(dx_ptr, acc, n, ih, iw, g * COLS + offs_n, sdx_n, sdx_c, sdx_h, sdx_w, mask_m, mask_n)


@triton.jit
def _grouped_conv2d_bwd_weight_tma_kernel(
    x_ptr, dy_ptr, y_ptr, dw_ptr, db_ptr,
    NB, H, W, OH, OW, CIN_G, COUT_G, G, KH: tl.constexpr, KW: tl.constexpr,
    pad_h, pad_w, dil_h, dil_w, SPLIT_SEGS,
    sx_n, sx_h, sx_w,
    sdy_n, sdy_h, sdy_w,
    sy_n, sy_h, sy_w,
    sdw_s, sdw_o, sdw_i, sdw_h, sdw_w,
    sdb_s, sdb_c,
    HAS_BIAS: tl.constexpr, RELU_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SEG_W: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):  # fmt: skip
    """Partial dw of one tap, a (BLOCK_CO x BLOCK_CI) tile, over the row segments of split ``program_id(1)``.

    The reduction runs over row segments: SEG_W consecutive output pixels of one image row (the output grid
    (NB, OH, OW) cut into NB*OH*cdiv(OW, SEG_W) segments, SPLIT_SEGS per split). A segment's dy box
    ``[1, 1, SEG_W, BLOCK_CO]`` and x box ``[1, 1, SEG_W, BLOCK_CI]`` (shifted by the tap) have only unit leading
    dimensions, so both stay 2-d tiles in shared memory for wgmma. x: (NB, G*CIN_G, H, W), dy, y: (NB, G*COUT_G,
    OH, OW), channel stride 1; dw: (splits, G*COUT_G, CIN_G, KH, KW), db: (splits, G*COUT_G), any strides.
    grid = (cdiv(COUT_G, BLOCK_CO) * cdiv(CIN_G, BLOCK_CI) * KH*KW, splits, G); the bias partial is written by the
    programs of tap 0 and input-channel tile 0.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    tiles_co = tl.cdiv(COUT_G, BLOCK_CO)
    tiles_ci = tl.cdiv(CIN_G, BLOCK_CI)
    pid_co = pid % tiles_co
    pid_ci = (pid // tiles_co) % tiles_ci
    tap = pid // (tiles_co * tiles_ci)
    kh = tap // KW
    kw = tap - kh * KW
    co0 = pid_co * BLOCK_CO
    ci0 = pid_ci * BLOCK_CI

    dy_desc = tl.make_tensor_descriptor(
        dy_ptr + g * COUT_G, shape=[NB, OH, OW, COUT_G], strides=[sdy_n, sdy_h, sdy_w, 1],
        block_shape=[1, 1, SEG_W, BLOCK_CO],
    )  # fmt: skip
    if RELU_GRAD:
        y_desc = tl.make_tensor_descriptor(
            y_ptr + g * COUT_G, shape=[NB, OH, OW, COUT_G], strides=[sy_n, sy_h, sy_w, 1],
            block_shape=[1, 1, SEG_W, BLOCK_CO],
        )  # fmt: skip
    x_desc = tl.make_tensor_descriptor(
        x_ptr + g * CIN_G, shape=[NB, H, W, CIN_G], strides=[sx_n, sx_h, sx_w, 1],
        block_shape=[1, 1, SEG_W, BLOCK_CI],
    )  # fmt: skip

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    segs_w = tl.cdiv(OW, SEG_W)
    s_start, s_end = split_bounds(split, SPLIT_SEGS, NB * OH * segs_w)
    for s in range(s_start, s_end):
        ow0 = (s % segs_w) * SEG_W
        row = s // segs_w
        oh = row % OH
        n = row // OH
        # Segment pixels past OW read dy's zero fill, so their x values (in bounds or zero fill) add nothing.
        dy = tl.reshape(dy_desc.load([n, oh, ow0, co0]), (SEG_W, BLOCK_CO))
        if RELU_GRAD:
            y = tl.reshape(y_desc.load([n, oh, ow0, co0]), (SEG_W, BLOCK_CO))
            dy = tl.where(y.to(tl.float32) > 0.0, dy, 0.0)
        x = tl.reshape(x_desc.load([n, oh + kh * dil_h - pad_h, ow0 + kw * dil_w - pad_w, ci0]), (SEG_W, BLOCK_CI))
        acc = tl.dot(tl.trans(dy.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                     out_dtype=ACC_DTYPE)  # fmt: skip
        if HAS_BIAS:
            db_acc += tl.sum(dy.to(ACC_DTYPE), axis=0)

    offs_co = co0 + tl.arange(0, BLOCK_CO)
    offs_ci = ci0 + tl.arange(0, BLOCK_CI)
    mask_co = offs_co < COUT_G
    mask_ci = offs_ci < CIN_G
    store_weight_grad_partial(dw_ptr, db_ptr, acc, db_acc, split, g, COUT_G, offs_co, offs_ci, mask_co, mask_ci, kh, kw,
                              tap, pid_ci, sdw_s, sdw_o, sdw_i, sdw_h, sdw_w, sdb_s, sdb_c, HAS_BIAS)


_KEY = ["G", "RED", "COLS", "KH", "KW", "OH", "OW", "dil_h", "dil_w", "TILE_H", "TILE_W", "DOT_DTYPE",
        "INPUT_PRECISION"]  # fmt: skip
_GPU_CONFIGS = TMA_CONFIGS_16BIT + TMA_CONFIGS_32BIT
_fwd_tma_autotuned = triton.autotune(
    configs=autotune_configs(_GPU_CONFIGS, INTERPRETER_CONFIG),
    key=[*_KEY, "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_grouped_conv2d_fwd_tma_kernel)
_bwd_input_tma_autotuned = triton.autotune(
    configs=autotune_configs(_GPU_CONFIGS, INTERPRETER_CONFIG),
    key=[*_KEY, "H", "W", "RELU_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_grouped_conv2d_bwd_input_tma_kernel)


# Weight gradient: (BLOCK_CO, BLOCK_CI, num_warps, num_stages); the reduction block is the row segment (SEG_W).
WG_BLOCKS = ("BLOCK_CO", "BLOCK_CI")
WG_CONFIGS_16BIT = [
    triton.Config({"BLOCK_CO": co, "BLOCK_CI": ci}, num_warps=w, num_stages=st)
    for co, ci, w, st in ((128, 128, 8, 4), (128, 64, 8, 4), (64, 128, 4, 4), (64, 64, 4, 4))
]
WG_CONFIGS_32BIT = [
    triton.Config({"BLOCK_CO": co, "BLOCK_CI": ci}, num_warps=w, num_stages=st)
    for co, ci, w, st in ((128, 64, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3))
]
WG_INTERPRETER_CONFIG = triton.Config({"BLOCK_CO": 16, "BLOCK_CI": 16}, num_warps=4, num_stages=1)
MIN_SEGMENT = 16
"""Fewest output pixels of a row the weight gradient's segments take (tl.dot's smallest reduction): it runs on TMA
for output widths of at least this many pixels."""


def wg_configs(dtype: str) -> list[triton.Config]:
    return WG_CONFIGS_32BIT if dtype == "fp32" else WG_CONFIGS_16BIT


def _prune_wg(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The operand type's configs, without tiles larger than both the channels' next power of two and the smallest
    tile offered on that axis (kept: at least the config of least padded work)."""
    allowed = wg_configs(TORCH_TO_TRITON_DTYPE[named_args["x_ptr"].dtype])
    kept = [c for c in configs if any(c is a for a in allowed)] or configs
    sizes = (int(named_args["COUT_G"]), int(named_args["CIN_G"]))
    limits = [max(triton.next_power_of_2(n), min(c.kwargs[b] for c in kept)) for b, n in zip(WG_BLOCKS, sizes)]
    small = [c for c in kept if all(c.kwargs[b] <= lim for b, lim in zip(WG_BLOCKS, limits))]
    return small or [_least_padding(kept, sizes)]


def _least_padding(configs: list[triton.Config], sizes: tuple[int, int]) -> triton.Config:
    def padded(c):
        return math.prod(triton.cdiv(n, c.kwargs[b]) * c.kwargs[b] for b, n in zip(WG_BLOCKS, sizes))

    return min(configs, key=padded)


_bwd_weight_tma_autotuned = triton.autotune(
    configs=autotune_configs(WG_CONFIGS_16BIT + WG_CONFIGS_32BIT, WG_INTERPRETER_CONFIG),
    key=["G", "CIN_G", "COUT_G", "KH", "KW", "OH", "OW", "dil_h", "dil_w", "SEG_W", "RELU_GRAD", "HAS_BIAS",
         "DOT_DTYPE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_wg},
    cache_results=True,
)(_grouped_conv2d_bwd_weight_tma_kernel)


# ---------------------------------------------------------------------------------------------------------------
# Eligibility and launchers


def _address(t: Tensor) -> int:
    """The address the kernel sees; for a meta tensor (launch capture) an allocation-aligned base plus the view's
    offset, as ``_common._PointerArg`` records it."""
    if t.device.type == "meta":
        return ALLOCATION_ALIGNMENT * 1024 + t.storage_offset() * t.element_size()
    return t.data_ptr()


def tma_strides(t: Tensor) -> tuple[int, int, int]:
    """The strides of a 4-d tensor's axes 0, 2 and 3 as its descriptor takes them (its axis 1 has unit stride). An
    axis of size 1 is never stepped, so its stride, whatever the tensor says (torch gives such axes any stride), is
    replaced by the dense channels_last one, which meets the 16-byte rule whenever the other strides do."""
    size_0, size_1, size_2, size_3 = t.shape
    dense = (size_1 * size_2 * size_3, size_1 * size_3, size_1)
    return tuple(d if n == 1 else s for n, s, d in zip((size_0, size_2, size_3), (t.stride(0), *t.stride()[2:]), dense))


def _why_not_operand(name: str, t: Tensor) -> str | None:
    """Why a 4-d tensor cannot be read by descriptors with unit stride on its axis 1 (channels), or None."""
    e = t.element_size()
    if t.stride(1) != 1 and t.shape[1] > 1:
        return f"{name} needs a unit stride on its channel axis (channels_last), got strides {t.stride()}"
    if any((s * e) % 16 for s in tma_strides(t)):
        return f"{name}'s strides {t.stride()} (but the channel one) must be multiples of 16 bytes"
    if _address(t) % 16:
        return f"{name}'s address is not 16-byte aligned"
    return None


def why_not_tma(
    geom: common.ConvGeometry, pass_name: str, input_precision: str, **tensors: Tensor | None
) -> str | None:
    """Why the TMA kernel cannot run ``pass_name`` ("fwd", "bwd_input" or "bwd_weight") of ``geom`` on ``tensors``
    (by name: the 4-d activations and weight it reads through descriptors; None is skipped), or None when it can:
    stride 1, tensor-core dots (fp16, bf16, fp32 as tf32), channels-contiguous tensors with 16-byte-aligned strides,
    per-group channel offsets and addresses (see the module docstring); the weight gradient also needs output rows of
    at least ``MIN_SEGMENT`` pixels."""
    present = {name: t for name, t in tensors.items() if t is not None}
    dtype = next(iter(present.values())).dtype
    if TORCH_TO_TRITON_DTYPE.get(dtype) not in TMA_DTYPES:
        return f"dtype {dtype} is not one of {TMA_DTYPES}"
    if dtype == torch.float32 and input_precision != "tf32":
        # FMA dots read the tiles from shared memory into registers; the input gradient's 128x64 fp32 tile took
        # 255 registers and spilled on sm_90, and the cp.async kernel has the tuned FMA tiles.
        return "fp32 with ieee precision runs on the FMA units (the cp.async kernel's tiles)"
    if geom.stride != (1, 1):
        return f"stride {geom.stride} is not 1"
    if pass_name == "bwd_weight" and geom.ow < MIN_SEGMENT:
        return f"output rows of {geom.ow} pixels are narrower than the weight gradient's {MIN_SEGMENT}-pixel segments"
    e = torch.empty((), dtype=dtype).element_size()
    for what, channels in (("input", geom.cin_g), ("output", geom.cout_g)):
        if (channels * e) % 16:  # a group's channel offset (and the weight's row strides) in 16-byte units
            return f"{channels} {what} channels per group are {channels * e} bytes, not a multiple of 16"
    return next((why for name, t in present.items() if (why := _why_not_operand(name, t))), None)


def choose(what: str, tma: bool | None, why_not: str | None, config: triton.Config | None,
           device: torch.device) -> bool:
    """The pass launchers' choice: ``tma`` True (an error naming ``why_not`` when the operands do not qualify) or
    False as asked; None: TMA when the operands qualify, no fixed ``config`` is given (a config names one kernel's
    tiles) and :func:`use_tma` holds for ``device``."""
    if tma is None:
        return why_not is None and config is None and use_tma(device)
    if tma and why_not is not None:
        raise ValueError(f"{what}: tma=True, but {why_not}")
    return tma


def use_tma(device: torch.device) -> bool:
    """The automatic choice: a CUDA device of compute capability >= 9 (never the interpreter or a CPU)."""
    return device.type == "cuda" and not is_interpreter() and torch.cuda.get_device_capability(device)[0] >= 9


def spatial_tile(oh: int, ow: int, block_m: int) -> tuple[int, int]:
    """(TILE_H, TILE_W): the rows and columns of one image a pixel tile covers, powers of two with at most
    ``min(block_m, MAX_SPATIAL_TILE)`` pixels, as wide as the image (to the next power of two) first."""
    cap = min(block_m, MAX_SPATIAL_TILE)
    tile_w = min(triton.next_power_of_2(ow), cap)
    tile_h = min(triton.next_power_of_2(oh), cap // tile_w)
    return tile_h, tile_w


def _configs(dtype: torch.dtype, config: triton.Config | None) -> list[triton.Config]:
    if config is not None:
        return [config]
    return autotune_configs(tma_configs(TORCH_TO_TRITON_DTYPE[dtype]), INTERPRETER_CONFIG)


def _launch_tma(kernel, args, constexprs, config, rows: tuple[int, int, int], cols: int, red: int, groups: int,
                dtype) -> None:
    """Pick the spatial tile for the smallest BLOCK_M that may run (so it divides every config's BLOCK_M), the
    pinned config under deterministic algorithms, and launch."""
    nb, oh, ow = rows
    configs = _configs(dtype, config)
    element = torch.empty((), dtype=dtype).element_size()
    for c in configs:
        if c.kwargs["BLOCK_M"] & (c.kwargs["BLOCK_M"] - 1) or c.kwargs["BLOCK_K"] * element < 16:
            raise ValueError(f"TMA conv: BLOCK_M must be a power of two and BLOCK_K at least 16 bytes, got {c}")
    tile_h, tile_w = spatial_tile(oh, ow, min(c.kwargs["BLOCK_M"] for c in configs))
    constexprs = {**constexprs, "TILE_H": tile_h, "TILE_W": tile_w}
    if config is None and common.configs_pinned():
        config = common.pinned_config(configs, common.MNK_BLOCKS, (nb * oh * ow, cols, red))

    def grid(meta):
        tile_n = meta["BLOCK_M"] // (tile_h * tile_w)
        tiles = triton.cdiv(nb, tile_n) * triton.cdiv(oh, tile_h) * triton.cdiv(ow, tile_w)
        return (tiles * triton.cdiv(cols, meta["BLOCK_N"]), groups)

    if args[0].device.type == "cuda":
        from .grouped_gemm_tma import set_scratch_allocator

        set_scratch_allocator()  # device-side descriptors live in global scratch memory
    launch(kernel, grid, args, constexprs, config)


def grouped_conv2d_fwd_tma(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: Tensor,
    geom: common.ConvGeometry,
    *,
    activation: str | None,
    residual: Tensor | None,
    input_precision: str,
    config: triton.Config | None,
) -> Tensor:
    """The forward on the TMA kernel; the caller (``grouped_conv2d_fwd``) has checked the tensors and ``geom``, and
    :func:`why_not_tma` returned None."""
    args = (
        x, weight, bias if bias is not None else weight, out, residual if residual is not None else out,
        geom.n, geom.h, geom.w, geom.oh, geom.ow, geom.cin_g, geom.cout_g, geom.groups, geom.kh, geom.kw,
        *geom.padding, *geom.dilation,
        *tma_strides(x), *tma_strides(weight),
        *out.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
    )  # fmt: skip
    constexprs = {
        "HAS_BIAS": bias is not None,
        "ACTIVATION": activation,
        "HAS_RESIDUAL": residual is not None,
        **common.dot_settings(x.dtype, input_precision),
    }
    _launch_tma(_fwd_tma_autotuned, args, constexprs, config, (geom.n, geom.oh, geom.ow), geom.cout_g, geom.cin_g,
                geom.groups, x.dtype)
    return out


def grouped_conv2d_bwd_input_tma(
    grad_out: Tensor,
    weight: Tensor,
    out: Tensor,
    geom: common.ConvGeometry,
    *,
    relu_output: Tensor | None,
    input_precision: str,
    config: triton.Config | None,
) -> Tensor:
    """The input gradient on the TMA kernel; the caller (``grouped_conv2d_bwd_input``) has checked the tensors and
    ``geom``, and :func:`why_not_tma` returned None."""
    y = relu_output if relu_output is not None else grad_out
    # Padding of the equivalent forward conv of dy: dil*(k-1) - pad, folded into the tap offsets in the kernel.
    args = (
        grad_out, weight, y, out,
        geom.n, geom.h, geom.w, geom.oh, geom.ow, geom.cout_g, geom.cin_g, geom.groups, geom.kh, geom.kw,
        *geom.padding, *geom.dilation,
        *tma_strides(grad_out), *tma_strides(weight), *tma_strides(y),
        *out.stride(),
    )  # fmt: skip
    constexprs = {"RELU_GRAD": relu_output is not None, **common.dot_settings(grad_out.dtype, input_precision)}
    _launch_tma(_bwd_input_tma_autotuned, args, constexprs, config, (geom.n, geom.h, geom.w), geom.cin_g,
                geom.cout_g, geom.groups, grad_out.dtype)
    return out


def segment_width(ow: int) -> int:
    """SEG_W: output pixels per row segment of the weight gradient's reduction (16 or 32; rows of at least
    MIN_SEGMENT pixels)."""
    return max(MIN_SEGMENT, min(triton.next_power_of_2(ow), 32))


def weight_grad_splits(geom: common.ConvGeometry, split_rows: int) -> tuple[int, int]:
    """(splits, segments per split) of the weight gradient: ``split_rows`` output pixels per split, rounded up to
    whole row segments."""
    seg = segment_width(geom.ow)
    segments = geom.n * geom.oh * triton.cdiv(geom.ow, seg)
    per_split = max(1, triton.cdiv(split_rows, seg))
    return triton.cdiv(segments, per_split), per_split


def grouped_conv2d_bwd_weight_tma(
    x: Tensor,
    grad_out: Tensor,
    relu_output: Tensor | None,
    dw: Tensor,
    db: Tensor | None,
    dw_strides: tuple[int, ...],
    db_strides: tuple[int, int],
    geom: common.ConvGeometry,
    *,
    splits: int,
    split_segments: int,
    input_precision: str,
    config: triton.Config | None,
) -> None:
    """The weight (and bias) gradient partials on the TMA kernel into ``dw`` / ``db`` (strides given: split stride
    first); the caller (``grouped_conv2d_bwd_weight``) has checked the tensors, sized the splits with
    :func:`weight_grad_splits` and reduces them; :func:`why_not_tma` returned None."""
    y = relu_output if relu_output is not None else grad_out
    seg = segment_width(geom.ow)
    args = (
        x, grad_out, y, dw, db if db is not None else dw,
        geom.n, geom.h, geom.w, geom.oh, geom.ow, geom.cin_g, geom.cout_g, geom.groups, geom.kh, geom.kw,
        *geom.padding, *geom.dilation, split_segments,
        *tma_strides(x), *tma_strides(grad_out), *tma_strides(y),
        *dw_strides, *db_strides,
    )  # fmt: skip
    constexprs = {
        "HAS_BIAS": db is not None,
        "RELU_GRAD": relu_output is not None,
        "SEG_W": seg,
        **common.dot_settings(x.dtype, input_precision),
    }
    if config is None:
        configs = autotune_configs(wg_configs(TORCH_TO_TRITON_DTYPE[x.dtype]), WG_INTERPRETER_CONFIG)
        if common.configs_pinned():  # the shared rule, with the segment as the reduction block
            ranked = [triton.Config({**c.kwargs, "BLOCK_R": seg}) for c in configs]
            best = common.pinned_config(ranked, (*WG_BLOCKS, "BLOCK_R"), (geom.cout_g, geom.cin_g, seg))
            config = configs[ranked.index(best)]

    def grid(meta):
        tiles = triton.cdiv(geom.cout_g, meta["BLOCK_CO"]) * triton.cdiv(geom.cin_g, meta["BLOCK_CI"])
        return (tiles * geom.kh * geom.kw, splits, geom.groups)

    if x.device.type == "cuda":
        from .grouped_gemm_tma import set_scratch_allocator

        set_scratch_allocator()
    launch(_bwd_weight_tma_autotuned, grid, args, constexprs, config)


# ---------------------------------------------------------------------------------------------------------------
# Offline compilation (kernels/report.py)


@dataclass(frozen=True)
class Sm90LaunchSpec(CompileSpec):
    """A launch-derived spec of a kernel the launchers run on sm_90 only (``capabilities``: the report builds it
    for those targets; on sm_80 descriptor loads would lower to ordinary loads, a build no launch runs)."""

    capabilities: tuple[int, ...] = (90,)


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _qualifies(shape: _launch_shapes.ConvShape, dtype: str) -> bool:
    e = torch.empty((), dtype=_TORCH_DTYPES[dtype]).element_size()
    return shape.stride == 1 and (shape.cin * e) % 16 == 0 and (shape.cout * e) % 16 == 0


def launch_cases() -> list[LaunchCase]:
    """Forward and input gradient of every stride-1 conv of the split WRN-28-10 and ResNet-56 whose channel counts
    meet TMA's rules (and the weight gradient where its rows have at least MIN_SEGMENT pixels), channels_last, per
    tensor-core dtype variant (bf16, fp16, fp32 as tf32) (plus the bias + ReLU epilogue / ReLU-masked gradient on one
    WRN layer): the pass launchers with ``tma=True`` on meta tensors, as on an sm_90 GPU."""
    from .grouped_conv2d_bwd_input import grouped_conv2d_bwd_input
    from .grouped_conv2d_bwd_weight import grouped_conv2d_bwd_weight
    from .grouped_conv2d_fwd import grouped_conv2d_fwd

    cases = []
    for dtype, precision in _launch_shapes.DTYPE_VARIANTS:
        if (dtype, precision) == ("fp32", "ieee"):
            continue  # the cp.async kernel's (why_not_tma)
        t = _TORCH_DTYPES[dtype]
        variant = f"{dtype}{'_' + precision if dtype == 'fp32' else ''}"
        shapes = [(s, False) for s in _launch_shapes.CONV_SHAPES if _qualifies(s, dtype)]
        shapes.append((_launch_shapes.CONV_SHAPES[2], True))
        for shape, epilogue in shapes:
            k, pad = shape.branches, shape.kernel // 2
            conv = dict(stride=(1, 1), padding=(pad, pad), dilation=(1, 1), groups=k, input_precision=precision)

            def new(*size, t=t):
                return torch.empty(size, dtype=t, device="meta").contiguous(memory_format=torch.channels_last)

            x = new(_launch_shapes.BATCH, k * shape.cin, shape.size, shape.size)
            w = new(k * shape.cout, shape.cin, shape.kernel, shape.kernel)
            y = new(_launch_shapes.BATCH, k * shape.cout, shape.size, shape.size)
            b = torch.empty(k * shape.cout, dtype=t, device="meta") if epilogue else None
            where = (f"{shape.model}/K{k} {shape.cin}->{shape.cout} k{shape.kernel}s1 {shape.size}px"
                     + (" bias+relu" if epilogue else ""))

            def fwd(x=x, w=w, b=b, y=y, conv=conv, epilogue=epilogue):
                grouped_conv2d_fwd(x, w, b, y, activation="relu" if epilogue else None, tma=True, **conv)

            def bwd(x=x, w=w, y=y, conv=conv, epilogue=epilogue):
                grouped_conv2d_bwd_input(y, w, x, relu_output=y if epilogue else None, tma=True, **conv)

            def bwd_weight(x=x, w=w, y=y, b=b, conv=conv, epilogue=epilogue):
                grouped_conv2d_bwd_weight(x, y, torch.empty_like(w), b, relu_output=y if epilogue else None, tma=True,
                                          **conv)  # fmt: skip

            label = f"{variant} channels_last {where}"
            cases.append(LaunchCase(f"fwd {label}", "fwd", fwd, variant, "channels_last"))
            if shape.cin != 3:  # the stem's input needs no gradient
                cases.append(LaunchCase(f"bwd_input {label}", "bwd_input", bwd, variant, "channels_last"))
            if shape.size >= MIN_SEGMENT:
                cases.append(LaunchCase(f"bwd_weight {label}", "bwd_weight", bwd_weight, variant, "channels_last"))
    return cases


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """The JIT specializations x configs of :func:`launch_cases`, built for sm_90 only."""
    specs = specs_from_launches("grouped_conv2d_tma", launch_cases())
    return [Sm90LaunchSpec(**{f.name: getattr(s, f.name) for f in fields(s)}) for s in specs]
