"""Grouped conv2d forward as an implicit GEMM: ``y = act(conv(x, w) + b)`` for G groups at once.

Per group g: GEMM rows M = N*OH*OW output pixels, columns Cout_g, reduction Cin_g*KH*KW, walked BLOCK_K input
channels at a time and, within each channel block, tap by tap (kh, kw). Every tensor is addressed through its own
strides; the launchers of all three passes copy an operand whose channel stride is not 1 (NCHW, an expanded
gradient) to channels_last first (``common.channels_contiguous``), so the loops always read channel-contiguous tiles
with 16-byte copies and never compile to gathers. The models avoid even that copy on the Triton path: they convert
to channels_last once, at their boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _grouped_conv2d_common as common
from . import grouped_conv2d_tma as _tma
from ._common import autotune_configs, check_launch_tensors, launch
from ._grouped_conv2d_common import block_range, pixel_coords, store_pixel_tile, tile_of

ACTIVATIONS = (None, "relu")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Pixel tiles of 64 to 256 rows, channel tiles of 16 to 256,
# reduction blocks of 16 to 64 (Inductor's conv template goes to 128, which took fp32 past 232 registers with
# spills on sm_80 here); 16-wide channel blocks divide the 80- and 112-channel layers exactly. Every config fits
# sm_80's shared memory in fp32 and stays within 232 registers without spills (the report checks both).
FWD_CONFIGS = common.tile_configs(
    common.MNK_BLOCKS,
    [
        (128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 64, 32, 4, 4),
        (256, 64, 32, 8, 3), (64, 256, 32, 8, 3), (128, 64, 64, 8, 3), (128, 16, 16, 4, 4),
    ],
)  # fmt: skip
INTERPRETER_CONFIG = common.MNK_INTERPRETER_CONFIG


@triton.jit
def _grouped_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, H, W, OH, OW, CIN_G, COUT_G, G, KH: tl.constexpr, KW: tl.constexpr,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    scale_ptr, shift_ptr, r_ptr, sr_n, sr_c, sr_h, sr_w, PRE_AFFINE_RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CH_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M output pixels) x (BLOCK_N output channels) tile of group ``program_id(1)``.

    x: (N, G*CIN_G, H, W), w: (G*COUT_G, CIN_G, KH, KW), b: (G*COUT_G,), y: (N, G*COUT_G, OH, OW), all strided.
    PRE_AFFINE_RELU: the conv reads ``relu(x * scale + shift)`` (scale, shift: (G*CIN_G,) in ACC_DTYPE, a batch
    norm + ReLU before the conv) computed on the loaded tile; padding taps stay 0 after the activation.
    HAS_RESIDUAL: r (the output's size, strided) is added before the activation: ``y = act(conv + b + r)``.
    M = N*OH*OW (< 2**31); grid = (cdiv(M, BLOCK_M) * cdiv(COUT_G, BLOCK_N), G). G only keys the autotuner.
    KH, KW are compile-time constants, so the tap of an iteration costs a multiply-shift, nothing for 1x1.
    CH_ALIGN (a power of two) divides CIN_G and the strides that step over channel rows (the launcher computes it):
    rewritten as ``v // CH_ALIGN * CH_ALIGN`` they keep their values and show the compiler the alignment the JIT's
    divisibility-by-16 specialization cannot (24 channels: 16-byte rows of 8 bf16), so the channel loads vectorise.
    """
    CIN_G = CIN_G // CH_ALIGN * CH_ALIGN
    sx_n = sx_n // CH_ALIGN * CH_ALIGN
    sx_h = sx_h // CH_ALIGN * CH_ALIGN
    sx_w = sx_w // CH_ALIGN * CH_ALIGN
    sw_o = sw_o // CH_ALIGN * CH_ALIGN
    sw_h = sw_h // CH_ALIGN * CH_ALIGN
    sw_w = sw_w // CH_ALIGN * CH_ALIGN
    pid_m, pid_n = tile_of(tl.program_id(0), COUT_G, BLOCK_N)
    g = tl.program_id(1).to(tl.int64)
    offs_m, mask_m = block_range(pid_m, M, BLOCK_M)
    offs_n, mask_n = block_range(pid_n, COUT_G, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n, oh, ow = pixel_coords(offs_m, OH, OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    x_rows = x_ptr + n * sx_n + g * CIN_G * sx_c  # [BLOCK_M] pointers to channel 0 of the group
    w_cols = w_ptr + (g * COUT_G + offs_n) * sw_o  # [BLOCK_N] pointers to weight rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    k_blocks = tl.cdiv(CIN_G, BLOCK_K)
    # One flat loop over (channel block, tap), taps fastest, so the compiler can pipeline loads across taps; the
    # divisors are constexpr (no runtime division per iteration).
    for it in range(0, k_blocks * (KH * KW)):
        cb = it // (KH * KW)
        tap = it - cb * (KH * KW)
        ci = cb * BLOCK_K + offs_k
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
        if PRE_AFFINE_RELU:
            ch = g * CIN_G + ci
            scale = tl.load(scale_ptr + ch, mask=mask_k, other=0.0)
            shift = tl.load(shift_ptr + ch, mask=mask_k, other=0.0)
            x = tl.maximum(x.to(ACC_DTYPE) * scale[None, :] + shift[None, :], 0.0)
            x = tl.where(row_ok[:, None] & mask_k[None, :], x, 0.0)  # zero padding is applied after the ReLU
        w = tl.load(
            w_cols[None, :] + ci.to(tl.int64)[:, None] * sw_i + kh * sw_h + kw * sw_w,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(b_ptr + g * COUT_G + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if HAS_RESIDUAL:
        r_rows = n * sr_n + oh.to(tl.int64) * sr_h + ow.to(tl.int64) * sr_w
        r = tl.load(r_ptr + r_rows[:, None] + ((g * COUT_G + offs_n) * sr_c)[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += r.to(ACC_DTYPE)
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    store_pixel_tile(y_ptr, acc, n, oh, ow, g * COUT_G + offs_n, sy_n, sy_c, sy_h, sy_w, mask_m, mask_n)


TF32_OPERANDS_PER_THREAD = 32
"""With tf32 dots, 8-warp forward tiles keep at most this many operand elements per thread per reduction step
(``BLOCK_K * (BLOCK_M + BLOCK_N)`` over the threads): on sm_80 the 40- and 48-element tiles (256x64x32, 64x256x32,
128x64x64) took 174-234 registers in the plain and fused forwards, at or past the 232 of headroom, where the
32-element ones (128x128x32, 128x64x32) took 128-208 (offline builds of the full check)."""


def within_tf32_budget(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    """The configs that keep a tf32 forward within :data:`TF32_OPERANDS_PER_THREAD` on 8 warps; all of ``configs``
    for other dots, or when none fits."""
    if not (args.get("DOT_DTYPE") == tl.float32 and args.get("INPUT_PRECISION") == "tf32"):
        return list(configs)
    kept = [c for c in configs
            if c.num_warps < 8 or common.operands_per_thread(c, common.MNK_BLOCKS) <= TF32_OPERANDS_PER_THREAD]
    return kept or list(configs)


_prune_sizes = common.prune_oversized(common.MNK_BLOCKS, (None, "COUT_G", "CIN_G"))


def within_forward_budgets(configs: list[triton.Config], args: dict, prologue: bool) -> list[triton.Config]:
    """The configs a forward launch with constexprs ``args`` may run, by the register budgets alone (no size
    pruning): the prologue's (with ``prologue``), tf32's and the FMA one. The autotuner's pruning and the pinned
    path both start from these."""
    configs = within_prologue_budget(configs, args) if prologue else configs
    return common.within_register_budget(within_tf32_budget(configs, args), common.MNK_BLOCKS, args)


def _prune_forward(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _prune_sizes(within_forward_budgets(configs, {**named_args, **kwargs}, prologue=False), named_args, **kwargs)


_grouped_conv2d_fwd_autotuned = triton.autotune(
    configs=autotune_configs(FWD_CONFIGS, INTERPRETER_CONFIG),
    # triton adds the tensors' dtypes to the key; DOT_DTYPE and INPUT_PRECISION tell fp32 from tf32 dots.
    key=["G", "CIN_G", "COUT_G", "KH", "KW", "OH", "OW", "stride_h", "stride_w", "dil_h", "dil_w", "sx_c",
         "HAS_BIAS", "ACTIVATION", "PRE_AFFINE_RELU", "HAS_RESIDUAL", "DOT_DTYPE", "INPUT_PRECISION", "CH_ALIGN"],
    prune_configs_by={"early_config_prune": _prune_forward},
    cache_results=True,
)(_grouped_conv2d_fwd_kernel)


def _prologue_fits(config: triton.Config) -> bool:
    """The operand prologue (PRE_AFFINE_RELU) holds the input tile in registers between load and dot: at most 16
    elements per thread. With 32 the fp32 builds took 234-255 registers on sm_90 (one spilled); with 16 every fused
    build stays within 232 (the offline report)."""
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] <= 16 * 32 * config.num_warps


PROLOGUE_FWD_CONFIGS = [c for c in FWD_CONFIGS if _prologue_fits(c)]

PROLOGUE_FP32_ACCUMULATORS_PER_THREAD = 32
"""With the prologue and fp32 operands (tf32 dots), at most this many accumulator elements per thread: the affine +
ReLU tile is fp32 in registers beside the accumulator, and on sm_80 the 64-per-thread tiles (128x128x32 and
64x256x32 on 8 warps) took 240-254 registers at the split WRN-28-10's 448 channels (offline builds)."""

PROLOGUE_FMA_ACCUMULATORS_PER_THREAD = 16
"""With the prologue and an FMA dot (fp32 ieee), at most this many accumulator elements per thread: within the plain
FMA budget, 64x64x32 on 4 warps spilled 12 B and 128x64x32 on 8 warps took 255 registers with 8 B spilled on sm_80
(offline builds)."""


def within_prologue_budget(configs: list[triton.Config], args: dict) -> list[triton.Config]:
    """The configs that keep a prologue launch with 32-bit operands within the registers
    (:data:`PROLOGUE_FP32_ACCUMULATORS_PER_THREAD`, :data:`PROLOGUE_FMA_ACCUMULATORS_PER_THREAD`); all of
    ``configs`` for 16-bit operands, or when none fits."""
    dot = args.get("DOT_DTYPE")
    if dot not in (tl.float32, tl.float64):
        return list(configs)
    limit = PROLOGUE_FMA_ACCUMULATORS_PER_THREAD if common.is_fma_dot(args) else PROLOGUE_FP32_ACCUMULATORS_PER_THREAD
    return [c for c in configs if common.accumulators_per_thread(c, common.MNK_BLOCKS) <= limit] or list(configs)


def _prune_prologue(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _prune_sizes(within_forward_budgets(configs, {**named_args, **kwargs}, prologue=True), named_args, **kwargs)


# The same kernel, key and pruning as the plain forward, tuned over the configs the prologue fits in.
_grouped_conv2d_fwd_prologue_autotuned = triton.autotune(
    configs=autotune_configs(PROLOGUE_FWD_CONFIGS, INTERPRETER_CONFIG),
    key=_grouped_conv2d_fwd_autotuned.keys,
    prune_configs_by={"early_config_prune": _prune_prologue},
    cache_results=True,
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
    pre_scale: Tensor | None = None,
    pre_shift: Tensor | None = None,
    residual: Tensor | None = None,
    tma: bool | None = None,
) -> Tensor:
    """Write ``act(conv2d(x, weight, bias, groups=groups))`` into ``out`` (any strides) and return it.

    ``groups`` is G = branches * inner groups; ``input_precision`` ("ieee"/"tf32") applies to fp32 dots on a GPU;
    ``config`` launches one fixed config instead of autotuning; without it, under
    ``torch.use_deterministic_algorithms(True)`` the shape's pinned config runs (``common.pinned_config``).
    ``pre_scale``/``pre_shift`` (both or neither; (C_in,), fp32, fp64 for fp64 x): the conv reads
    ``relu(x * pre_scale + pre_shift)`` per input channel instead of x. ``residual`` (the output's size and dtype, any
    strides) is added before the activation. ``tma``: True runs the sm_90 TMA kernel (``grouped_conv2d_tma.py``; an
    error when the operands do not qualify), False the cp.async kernel, None the TMA kernel on a CUDA device of
    capability >= 9 when the operands qualify (stride 1, channels_last, 16-byte rules; not with the prologue) and no
    fixed ``config`` is given (a config names one kernel's tiles).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_launch_tensors("grouped_conv2d_fwd", x.dtype, x=x, weight=weight, bias=bias, out=out)
    geom = common.ConvGeometry.of(x.shape, weight.shape, stride, padding, dilation, groups)
    common.check_out("grouped_conv2d_fwd", out, geom.output_size, x.dtype, x.device)
    if bias is not None and tuple(bias.shape) != (groups * geom.cout_g,):
        raise ValueError(f"grouped_conv2d_fwd: bias must be ({groups * geom.cout_g},), got {tuple(bias.shape)}")
    pre_acc = _check_fusion_operands(x, geom, pre_scale, pre_shift, residual)
    m = geom.n * geom.oh * geom.ow
    if m == 0:
        return out
    common.check_int32_pixels("grouped_conv2d_fwd", m, f"N*OH*OW = {m} output pixels")
    x, weight, residual = (common.channels_contiguous(t) for t in (x, weight, residual))
    target, out = out, common.channels_contiguous_output(out)
    why_not = ("the BN + ReLU prologue runs on the cp.async kernel" if pre_acc
               else _tma.why_not_tma(geom, "fwd", input_precision, x=x, weight=weight))
    tma = _tma.choose("grouped_conv2d_fwd", tma, why_not, config, x.device)
    if tma:
        _tma.grouped_conv2d_fwd_tma(x, weight, bias, out, geom, activation=activation, residual=residual,
                                    input_precision=input_precision, config=config)
        return common.finish_output(target, out)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(geom.cout_g, meta["BLOCK_N"]), groups)

    w_strides = common.weight_strides(weight.stride(), weight.shape[2:])
    args = (
        x, weight, bias if bias is not None else weight, out,
        m, geom.h, geom.w, geom.oh, geom.ow, geom.cin_g, geom.cout_g, groups, geom.kh, geom.kw,
        *geom.conv_args(),
        *x.stride(), *w_strides, *out.stride(),
        *((pre_scale, pre_shift) if pre_acc else (weight, weight)), residual if residual is not None else weight,
        *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        pre_acc, residual is not None,
    )  # fmt: skip
    constexprs = {
        "HAS_BIAS": bias is not None, "ACTIVATION": activation, **common.dot_settings(x.dtype, input_precision),
        "CH_ALIGN": common.channel_alignment(geom.cin_g, x.stride(0), x.stride(2), x.stride(3), *w_strides[::2],
                                             w_strides[3]),
    }  # fmt: skip
    if config is None and common.configs_pinned():
        configs = within_forward_budgets(
            autotune_configs(PROLOGUE_FWD_CONFIGS if pre_acc else FWD_CONFIGS, INTERPRETER_CONFIG), constexprs,
            prologue=bool(pre_acc))
        config = common.pinned_config(configs, common.MNK_BLOCKS, (m, geom.cout_g, geom.cin_g))
    kernel = _grouped_conv2d_fwd_prologue_autotuned if pre_acc else _grouped_conv2d_fwd_autotuned
    launch(kernel, grid, args, constexprs, config)
    return common.finish_output(target, out)


def _check_fusion_operands(
    x: Tensor, geom: common.ConvGeometry, pre_scale: Tensor | None, pre_shift: Tensor | None, residual: Tensor | None
) -> bool:
    """Check the fused prologue's and epilogue's operands (they are read through raw pointers); True when the
    prologue (``pre_scale``, ``pre_shift``) is given."""
    if (pre_scale is None) != (pre_shift is None):
        raise ValueError("grouped_conv2d_fwd: pre_scale and pre_shift must be given together")
    if residual is not None:
        check_launch_tensors("grouped_conv2d_fwd", x.dtype, x=x, residual=residual)
        common.check_output_shaped("grouped_conv2d_fwd", geom, residual=residual)
    if pre_scale is None:
        return False
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    check_launch_tensors("grouped_conv2d_fwd", acc, pre_scale=pre_scale, pre_shift=pre_shift)
    channels = geom.groups * geom.cin_g
    for name, t in (("pre_scale", pre_scale), ("pre_shift", pre_shift)):
        if tuple(t.shape) != (channels,) or t.stride() != (1,) or t.device != x.device:
            raise ValueError(f"grouped_conv2d_fwd: {name} must be a contiguous ({channels},) tensor on {x.device}, got "
                             f"{tuple(t.shape)} with strides {t.stride()} on {t.device}")
    return True

