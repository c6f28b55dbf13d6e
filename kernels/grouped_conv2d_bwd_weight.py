"""Grouped conv2d weight (and bias) gradient as an implicit GEMM with a deterministic split-K.

dw[co, ci, kh, kw] = sum over the R = N*OH*OW output pixels of dy[n, co, oh, ow] * x[n, ci, ih, iw] with
ih = oh*stride_h - pad_h + kh*dil_h. Per group this is a (COUT_G x CIN_G) GEMM per tap whose reduction R is long
(batch times image), so R is split into chunks of ``split_rows`` on grid axis 1: each split writes its fp32
partial sum into its own slot of a ``(splits, *weight.shape)`` buffer, and one ``sum(0)`` reduces the slots in a
fixed order. With a single split the kernel writes the gradient directly.

Reproducibility, precisely: no pass uses atomics, so two launches with the same inputs (values, shapes and strides),
the same config, the same ``split_rows``, on the same GPU model with the same triton and torch, give the same
bits. What can change between processes is the config (the autotuner picks by timing; its picks are cached on disk
in triton's cache, so later processes sharing that cache reuse the first pick, and a fresh cache or another machine
tunes again) and the default ``split_rows`` (it follows the GPU's SM count). Under ``torch.use_deterministic_algorithms(True)`` every pass runs
the config pinned by the shape alone (``common.pinned_config``), so the bits then depend only on the inputs, the GPU
model and the software versions; pass ``split_rows`` too to drop the GPU-model dependence of this pass's splits.

The bias gradient (sum of dy over N, OH, OW) is fused into the same pass, and so is an optional ReLU output mask
(dy * (y > 0)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _grouped_conv2d_common as common
from . import grouped_conv2d_tma as _tma
from ._common import (
    accumulator_dtype,
    autotune_configs,
    check_launch_tensors,
    launch,
    multiprocessor_count,
)
from ._grouped_conv2d_common import block_range, pixel_coords, split_bounds, store_weight_grad_partial

BLOCKS = ("BLOCK_CO", "BLOCK_CI", "BLOCK_R")
# (BLOCK_CO, BLOCK_CI, BLOCK_R, num_warps, num_stages). The reduction over pixels is long, so blocks of up to 128
# rows; output-channel tiles of at least 64 rows (sm_90's wgmma needs 64 per warp group); 16-wide input-channel
# tiles divide the 80- and 112-channel layers exactly. Every config fits sm_80's shared memory in fp32 and stays
# within 232 registers without spills (128x128 tiles with 64-row blocks, and 4-warp tiles with 128-row or 64x64x64
# blocks, took 255 and spilled; 256x64 tiles with 32-row blocks took 240-252 on sm_80: hence 16-row blocks there;
# 128x64 on 4 warps took 236-254: 8 warps).
BWD_WEIGHT_CONFIGS = common.tile_configs(
    BLOCKS,
    [
        (128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 32, 64, 4, 3),
        (256, 64, 16, 8, 4), (64, 128, 64, 8, 3), (64, 64, 128, 8, 2), (64, 16, 64, 4, 3),
    ],
)  # fmt: skip
# FMA dots (fp32 ieee, fp64) need no 64-row tiles (wgmma's minimum), so these serve FMA launches only: a layer of
# few channels per group (ResNet-56 split in two: 12-48) gets a tile near its size instead of a 64x64 tile that is
# mostly padding (and that spilled inside its loop on sm_80 at 12 and 24 channels).
BWD_WEIGHT_FMA_CONFIGS = common.tile_configs(BLOCKS, [(32, 32, 32, 4, 3), (16, 16, 64, 4, 3)])
MIN_TENSOR_CORE_ROWS = 64
(INTERPRETER_CONFIG,) = common.tile_configs(BLOCKS, [(16, 16, 16, 4, 1)])

# Split sizing: on a GPU aim for about 4 waves of programs, never fewer than MIN_SPLIT_ROWS rows per split, and
# keep split boundaries on multiples of the largest BLOCK_R. The interpreter uses tiny splits so that the tests
# exercise the multi-split reduction.
MIN_SPLIT_ROWS = 2048
SPLIT_ROWS_MULTIPLE = 128
INTERPRETER_SPLIT_ROWS = 64
MAX_SPLITS = 65535  # splits run on grid axis 1, limited to 65535 programs on CUDA


@triton.jit
def _grouped_conv2d_bwd_weight_kernel(
    x_ptr, dy_ptr, y_ptr, dw_ptr, db_ptr,
    R, SPLIT_ROWS, H, W, OH, OW, CIN_G, COUT_G, G, KH: tl.constexpr, KW: tl.constexpr,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sy_n, sy_c, sy_h, sy_w,
    sdw_s, sdw_o, sdw_i, sdw_h, sdw_w,
    sdb_s, sdb_c,
    HAS_BIAS: tl.constexpr, RELU_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CH_ALIGN: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Partial dw for one tap, a (BLOCK_CO x BLOCK_CI) tile, output pixels [split*SPLIT_ROWS, +SPLIT_ROWS), group g.

    x: (N, G*CIN_G, H, W); dy, y: (N, G*COUT_G, OH, OW); dw: (splits, G*COUT_G, CIN_G, KH, KW); db: (splits, G*COUT_G).
    grid = (cdiv(COUT_G, BLOCK_CO) * cdiv(CIN_G, BLOCK_CI) * KH*KW, splits, G). The bias partial is written by the
    programs of tap 0 and channel tile 0. G and KH only key the autotuner; KW is a constant divisor.
    CH_ALIGN: a power of two dividing the channel counts and the strides over channel rows (see the forward kernel).
    """
    CIN_G = CIN_G // CH_ALIGN * CH_ALIGN
    COUT_G = COUT_G // CH_ALIGN * CH_ALIGN
    sx_n = sx_n // CH_ALIGN * CH_ALIGN
    sx_h = sx_h // CH_ALIGN * CH_ALIGN
    sx_w = sx_w // CH_ALIGN * CH_ALIGN
    sdy_n = sdy_n // CH_ALIGN * CH_ALIGN
    sdy_h = sdy_h // CH_ALIGN * CH_ALIGN
    sdy_w = sdy_w // CH_ALIGN * CH_ALIGN
    sy_n = sy_n // CH_ALIGN * CH_ALIGN
    sy_h = sy_h // CH_ALIGN * CH_ALIGN
    sy_w = sy_w // CH_ALIGN * CH_ALIGN
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    tiles_co = tl.cdiv(COUT_G, BLOCK_CO)
    tiles_ci = tl.cdiv(CIN_G, BLOCK_CI)
    # Output-channel tiles vary fastest: programs reading the same input gather run together.
    pid_co = pid % tiles_co
    pid_ci = (pid // tiles_co) % tiles_ci
    tap = pid // (tiles_co * tiles_ci)
    kh = tap // KW
    kw = tap - kh * KW

    offs_co, mask_co = block_range(pid_co, COUT_G, BLOCK_CO)
    offs_ci, mask_ci = block_range(pid_ci, CIN_G, BLOCK_CI)
    dy_cols = dy_ptr + ((g * COUT_G + offs_co) * sdy_c)[:, None]  # [BLOCK_CO, 1]
    y_cols = y_ptr + ((g * COUT_G + offs_co) * sy_c)[:, None]
    x_cols = x_ptr + ((g * CIN_G + offs_ci) * sx_c)[None, :]  # [1, BLOCK_CI]

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_CO,), dtype=ACC_DTYPE)
    r_start, r_end = split_bounds(split, SPLIT_ROWS, R)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r_end
        n, oh, ow = pixel_coords(offs_r, OH, OW)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        x_ok = mask_r & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)

        dy_ok = mask_co[:, None] & mask_r[None, :]
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        dy_t = tl.load(dy_cols + (n * sdy_n + oh64 * sdy_h + ow64 * sdy_w)[None, :], mask=dy_ok, other=0.0)
        dy_t = dy_t.to(DOT_DTYPE)
        if RELU_GRAD:
            # An independent load and a select (not a load masked by y > 0), so both loads can be pipelined.
            y = tl.load(y_cols + (n * sy_n + oh64 * sy_h + ow64 * sy_w)[None, :], mask=dy_ok, other=0.0)
            dy_t = tl.where(y.to(tl.float32) > 0.0, dy_t, 0.0)
        x_off = n * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        x = tl.load(x_cols + x_off[:, None], mask=x_ok[:, None] & mask_ci[None, :], other=0.0)
        acc = tl.dot(dy_t, x.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            db_acc += tl.sum(dy_t.to(ACC_DTYPE), axis=1)

    store_weight_grad_partial(dw_ptr, db_ptr, acc, db_acc, split, g, COUT_G, offs_co, offs_ci, mask_co, mask_ci, kh, kw,
                              tap, pid_ci, sdw_s, sdw_o, sdw_i, sdw_h, sdw_w, sdb_s, sdb_c, HAS_BIAS)


def within_dot_kind(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    """The configs a launch with constexprs ``args`` may run: all for an FMA dot; for a tensor-core dot those of at
    least :data:`MIN_TENSOR_CORE_ROWS` rows (the FMA-only tiles dropped), or all when none has."""
    if common.is_fma_dot(args):
        return list(configs)
    return [c for c in configs if c.kwargs["BLOCK_CO"] >= MIN_TENSOR_CORE_ROWS] or list(configs)


_prune_sizes = common.prune_oversized(BLOCKS, ("COUT_G", "CIN_G", None))


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _prune_sizes(within_dot_kind(configs, {**named_args, **kwargs}), named_args, **kwargs)


_TUNED_CONFIGS = autotune_configs(BWD_WEIGHT_CONFIGS + BWD_WEIGHT_FMA_CONFIGS, INTERPRETER_CONFIG)
_grouped_conv2d_bwd_weight_autotuned = triton.autotune(
    configs=_TUNED_CONFIGS,
    # triton adds the tensors' dtypes to the key; DOT_DTYPE and INPUT_PRECISION tell fp32 from tf32 dots.
    key=["G", "CIN_G", "COUT_G", "KH", "KW", "OH", "OW", "stride_h", "stride_w", "dil_h", "dil_w", "sx_c",
         "RELU_GRAD", "HAS_BIAS", "DOT_DTYPE", "INPUT_PRECISION", "CH_ALIGN"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_grouped_conv2d_bwd_weight_kernel)


def default_split_rows(geom: common.ConvGeometry, device: torch.device) -> int:
    """Output pixels per split of the weight-gradient reduction (see the module docstring)."""
    rows = geom.n * geom.oh * geom.ow
    sms = multiprocessor_count(device)
    if sms is None:
        return INTERPRETER_SPLIT_ROWS
    tiles = triton.cdiv(geom.cout_g, 64) * triton.cdiv(geom.cin_g, 64) * geom.kh * geom.kw * geom.groups
    splits = max(1, min(triton.cdiv(4 * sms, tiles), rows // MIN_SPLIT_ROWS))
    return triton.cdiv(triton.cdiv(rows, splits), SPLIT_ROWS_MULTIPLE) * SPLIT_ROWS_MULTIPLE


def grouped_conv2d_bwd_weight(
    x: Tensor,
    grad_out: Tensor,
    weight_out: Tensor,
    bias_out: Tensor | None = None,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    relu_output: Tensor | None = None,
    split_rows: int | None = None,
    input_precision: str = "ieee",
    config: triton.Config | None = None,
    tma: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Write the weight gradient (and, with ``bias_out``, the bias gradient) of ``conv2d(x, w, groups=groups)``.

    ``weight_out`` has the weight's shape and any strides; ``grad_out`` may have any strides (stride 0 included).
    ``relu_output`` masks the gradient by ``relu_output > 0`` first. ``split_rows`` overrides the split size.
    ``config`` launches one fixed config; without it, under ``torch.use_deterministic_algorithms(True)`` the
    shape's pinned config runs (``common.pinned_config``), otherwise the autotuner picks. ``tma``: True runs the sm_90
    TMA kernel (``grouped_conv2d_tma.py``; an error when the operands do not qualify), False the cp.async kernel,
    None the TMA kernel on a CUDA device of capability >= 9 when the operands qualify (stride 1, channels_last,
    16-byte rules, output rows of at least 16 pixels) and no fixed ``config`` is given (a config names one kernel's
    tiles); its splits are whole row segments of about ``split_rows`` pixels.
    """
    check_launch_tensors(
        "grouped_conv2d_bwd_weight",
        x.dtype,
        x=x,
        grad_out=grad_out,
        weight_out=weight_out,
        bias_out=bias_out,
        relu_output=relu_output,
    )
    geom = common.ConvGeometry.of(x.shape, weight_out.shape, stride, padding, dilation, groups)
    common.check_output_shaped("grouped_conv2d_bwd_weight", geom, grad_out=grad_out, relu_output=relu_output)
    if bias_out is not None:
        common.check_out("grouped_conv2d_bwd_weight bias_out", bias_out, (groups * geom.cout_g,), x.dtype, x.device)
    rows = geom.n * geom.oh * geom.ow
    if rows == 0:  # an empty batch: the sums are empty
        weight_out.zero_()
        if bias_out is not None:
            bias_out.zero_()
        return weight_out, bias_out
    common.check_int32_pixels("grouped_conv2d_bwd_weight", rows, f"N*OH*OW = {rows} output pixels")
    split_rows = default_split_rows(geom, x.device) if split_rows is None else split_rows
    if split_rows < 1:
        raise ValueError(f"grouped_conv2d_bwd_weight: split_rows must be >= 1, got {split_rows}")
    x, grad_out, relu_output = (common.channels_contiguous(t) for t in (x, grad_out, relu_output))
    why_not = _tma.why_not_tma(geom, "bwd_weight", input_precision, x=x, grad_out=grad_out,
                               relu_output=relu_output)
    tma = _tma.choose("grouped_conv2d_bwd_weight", tma, why_not, config, x.device)
    splits, split_segments = _tma.weight_grad_splits(geom, split_rows) if tma else (triton.cdiv(rows, split_rows), 0)
    if splits > MAX_SPLITS:
        raise ValueError(
            f"grouped_conv2d_bwd_weight: split_rows={split_rows} gives {splits} splits, more than the {MAX_SPLITS} "
            "a grid axis allows"
        )

    # The kernel writes a weight layout with input-channel stride 1 (channels_last), whatever weight_out's: every
    # launch then compiles the same specializations as a channels_last model's (the weight is small; a copy is cheap).
    if splits == 1:
        # One split: write the gradients in place (split stride 0), cast to their dtype at the store.
        dw, db = common.channels_contiguous_output(weight_out), bias_out
        dw_strides = (0, *dw.stride())
        db_strides = (0, *db.stride()) if db is not None else (0, 0)
    else:
        acc = accumulator_dtype(x.dtype)
        slot_strides = torch.empty(geom.weight_size, device="meta", memory_format=torch.channels_last).stride()
        slot = weight_out.numel()
        dw = torch.empty_strided((splits, *geom.weight_size), (slot, *slot_strides), dtype=acc, device=x.device)
        db = None if bias_out is None else torch.empty((splits, groups * geom.cout_g), dtype=acc, device=x.device)
        dw_strides = dw.stride()
        db_strides = db.stride() if db is not None else (0, 0)

    dw_strides = common.weight_strides(dw_strides, (geom.kh, geom.kw))  # both layouts of a 1x1 gradient compile alike

    def grid(meta):
        tiles = triton.cdiv(geom.cout_g, meta["BLOCK_CO"]) * triton.cdiv(geom.cin_g, meta["BLOCK_CI"])
        return (tiles * geom.kh * geom.kw, splits, groups)

    y = relu_output if relu_output is not None else grad_out
    args = (
        x, grad_out, y, dw, db if db is not None else dw,
        rows, split_rows, geom.h, geom.w, geom.oh, geom.ow, geom.cin_g, geom.cout_g, groups, geom.kh, geom.kw,
        *geom.conv_args(),
        *x.stride(), *grad_out.stride(), *y.stride(), *dw_strides, *db_strides,
    )  # fmt: skip
    constexprs = {
        "HAS_BIAS": bias_out is not None,
        "RELU_GRAD": relu_output is not None,
        **common.dot_settings(x.dtype, input_precision),
        "CH_ALIGN": common.channel_alignment(geom.cin_g, geom.cout_g, *(
            t.stride(d) for t in (x, grad_out, y) for d in (0, 2, 3))),
    }
    if tma:
        _tma.grouped_conv2d_bwd_weight_tma(
            x, grad_out, relu_output, dw, db, dw_strides, db_strides, geom, splits=splits,
            split_segments=split_segments, input_precision=input_precision, config=config,
        )  # fmt: skip
    else:
        if config is None and common.configs_pinned():
            configs = common.within_register_budget(within_dot_kind(_TUNED_CONFIGS, constexprs), BLOCKS, constexprs)
            config = common.pinned_config(configs, BLOCKS, (geom.cout_g, geom.cin_g, min(split_rows, rows)))
        launch(_grouped_conv2d_bwd_weight_autotuned, grid, args, constexprs, config)
    if splits > 1:
        # Deterministic: a fixed-order reduction over the split axis, then one cast into the caller's layout.
        weight_out.copy_(dw.sum(0))
        if bias_out is not None:
            bias_out.copy_(db.sum(0))
    else:
        common.finish_output(weight_out, dw)
    return weight_out, bias_out
