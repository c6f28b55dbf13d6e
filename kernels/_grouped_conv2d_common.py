"""Shared pieces of the three grouped conv2d passes: the conv geometry, dot dtypes, launcher checks, the
``@triton.jit`` index helpers the kernels inline.

Each pass (``grouped_conv2d_fwd``, ``grouped_conv2d_bwd_input``, ``grouped_conv2d_bwd_weight``) is one implicit GEMM
over ``G = branches * groups`` independent convolutions of a channel-stacked tensor; group ``g`` owns input channels
``[g*Cin_g, (g+1)*Cin_g)``, output channels and weight rows ``[g*Cout_g, (g+1)*Cout_g)``, exactly like
``nn.Conv2d(groups=G)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INPUT_PRECISIONS, SUPPORTED_DTYPES, check_input_precision, is_interpreter

MNK_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
"""Tile constexprs of the passes that tile (pixels x channels) and reduce BLOCK_K at a time (fwd, bwd_input)."""


def tile_configs(blocks: tuple[str, ...], rows: list[tuple[int, ...]]) -> list[triton.Config]:
    """One ``triton.Config`` per row ``(*block sizes in the order of blocks, num_warps, num_stages)``."""
    return [triton.Config(dict(zip(blocks, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


# Small blocks: the interpreter runs programs one by one, and small tiles exercise multi-tile tails on tiny tests.
(MNK_INTERPRETER_CONFIG,) = tile_configs(MNK_BLOCKS, [(32, 16, 16, 4, 1)])


def padded_work(config: triton.Config, blocks: tuple[str, str, str], sizes: tuple[int, int, int]) -> float:
    """Work of one launch with ``config`` over the work it must do: each of the three ``sizes`` (rows, columns,
    reduction) rounded up to its block (``blocks`` names the block constexprs in that order), multiplied, over
    their plain product. 1.0 means no tile does padded work."""
    padded = 1.0
    for name, size in zip(blocks, sizes):
        block = config.kwargs[name]
        padded *= triton.cdiv(size, block) * block / size
    return padded


FMA_ELEMENTS_PER_THREAD = 32
"""Register budget of a tile whose dot runs on the FMA units (fp32 with ``input_precision="ieee"``, fp64): at most
this many accumulator elements per thread, and at most this many operand elements per thread per reduction step
(``BLOCK_K * (rows + columns)`` over the threads). The FMA dot keeps the accumulator and both operand fragments
of a step in registers; the offline sm_80 builds of the split WRN-28-10's 112-channel conv (fp32 ieee) put every
config past either bound at 255 registers or spilling (8-900 B), every config within both at 95-220 without
spills."""


def is_fma_dot(args: dict) -> bool:
    """True when the launch's ``DOT_DTYPE``/``INPUT_PRECISION`` constexprs put its dot on the FMA units."""
    dot = args.get("DOT_DTYPE")
    return dot == tl.float64 or (dot == tl.float32 and args.get("INPUT_PRECISION") == "ieee")


def accumulators_per_thread(config: triton.Config, blocks: tuple[str, str, str]) -> float:
    return config.kwargs[blocks[0]] * config.kwargs[blocks[1]] / (32 * config.num_warps)


def operands_per_thread(config: triton.Config, blocks: tuple[str, str, str], row_tiles: int = 1) -> float:
    """Operand elements per thread per reduction step; ``row_tiles`` row-operand tiles are loaded per step."""
    rows, cols, depth = (config.kwargs[b] for b in blocks)
    return depth * (row_tiles * rows + cols) / (32 * config.num_warps)


def fits_fma_registers(config: triton.Config, blocks: tuple[str, str, str], row_tiles: int = 1) -> bool:
    """``config`` keeps an FMA dot within :data:`FMA_ELEMENTS_PER_THREAD` (``blocks``: rows, columns, reduction;
    ``row_tiles``: as :func:`operands_per_thread`)."""
    elements = max(accumulators_per_thread(config, blocks), operands_per_thread(config, blocks, row_tiles))
    return elements <= FMA_ELEMENTS_PER_THREAD


MIN_FMA_REDUCTION_BLOCK = 16


def within_register_budget(configs: list[triton.Config], blocks: tuple[str, str, str],
                           args: dict) -> list[triton.Config]:
    """The configs of ``configs`` whose tiles fit the registers for a launch with arguments and constexprs
    ``args``: FMA dots within :func:`fits_fma_registers`. A ReLU-gradient launch (``RELU_GRAD``) loads the saved
    output beside the gradient, a second row-operand tile per step; when none of its configs fits, it takes the
    configs that fit without that tile with their reduction block halved (down to :data:`MIN_FMA_REDUCTION_BLOCK`)
    until they fit. Failing both, all configs. A config over budget is never run, so it is never built either."""
    if not is_fma_dot(args):
        return list(configs)
    row_tiles = 2 if args.get("RELU_GRAD") else 1
    kept = [c for c in configs if fits_fma_registers(c, blocks, row_tiles)]
    if not kept and row_tiles > 1:
        kept = _halve_reduction_to_fit([c for c in configs if fits_fma_registers(c, blocks)], blocks, row_tiles)
    return kept or list(configs)


def _halve_reduction_to_fit(configs: list[triton.Config], blocks: tuple[str, str, str],
                            row_tiles: int) -> list[triton.Config]:
    """Each config with its reduction block halved until it fits with ``row_tiles`` row tiles (distinct ones; a
    config that does not fit at :data:`MIN_FMA_REDUCTION_BLOCK` is left out)."""
    out: dict[tuple, triton.Config] = {}
    for c in configs:
        while not fits_fma_registers(c, blocks, row_tiles) and c.kwargs[blocks[2]] > MIN_FMA_REDUCTION_BLOCK:
            c = triton.Config({**c.kwargs, blocks[2]: c.kwargs[blocks[2]] // 2},
                              num_warps=c.num_warps, num_stages=c.num_stages)
        if fits_fma_registers(c, blocks, row_tiles):
            out.setdefault((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages), c)
    return list(out.values())


def prune_oversized(blocks: tuple[str, str, str], size_args: tuple[str | None, str | None, str | None]):
    """An ``early_config_prune`` for ``triton.autotune``: keep the configs within the register budget
    (:func:`within_register_budget`), then drop those with a block larger than both the next power of two of its
    axis's size and the smallest block the configs offer on that axis (such a tile is mostly padding, and a smaller
    one does the same useful work), keeping at least the config of least padded work. ``size_args`` names the
    kernel arguments holding the rows, columns and reduction sizes; None leaves an axis alone (a size that follows
    the batch, which the tuning key leaves out)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        configs = within_register_budget(configs, blocks, args)
        sizes = tuple(2**30 if name is None else max(1, int(args[name])) for name in size_args)
        limits = [
            max(triton.next_power_of_2(n), min(c.kwargs[b] for c in configs)) for b, n in zip(blocks, sizes)
        ]  # fmt: skip
        kept = [c for c in configs if all(c.kwargs[b] <= lim for b, lim in zip(blocks, limits))]
        return kept or [min(configs, key=lambda c: padded_work(c, blocks, sizes))]

    return prune


MAX_CHANNEL_ALIGNMENT = 16


def channel_alignment(*values: int) -> int:
    """The largest power of two up to :data:`MAX_CHANNEL_ALIGNMENT` dividing every value (a channel count and the
    strides that step over channel rows): the ``CH_ALIGN`` constexpr of the conv kernels."""
    align = MAX_CHANNEL_ALIGNMENT
    while align > 1 and any(int(v) % align for v in values):
        align //= 2
    return align


def configs_pinned() -> bool:
    """True when the launchers pick their config by :func:`pinned_config` instead of timing: whenever
    ``torch.use_deterministic_algorithms(True)`` is in force (a reproducible run asked for)."""
    return torch.are_deterministic_algorithms_enabled()


def pinned_config(
    configs: list[triton.Config], blocks: tuple[str, str, str], sizes: tuple[int, int, int]
) -> triton.Config:
    """The config a launch of ``sizes`` (rows, columns, reduction) uses when configs are pinned: a rule on the
    shape alone, so every process and every machine picks the same one (and with it the same summation order).

    The rule, a rough cost model and no timing: least ``padded_work * (1 + 16/rows_block + 16/columns_block)``
    (padded work times operand traffic per multiply-add, which favours large tiles that waste little), rounded to
    0.1%; ties go to the larger reduction block, then to the earlier config of ``configs``.
    """
    sizes = tuple(max(1, int(n)) for n in sizes)

    def rank(indexed: tuple[int, triton.Config]) -> tuple:
        i, c = indexed
        traffic = 1 + 16 / c.kwargs[blocks[0]] + 16 / c.kwargs[blocks[1]]
        return (round(padded_work(c, blocks, sizes) * traffic, 3), -c.kwargs[blocks[2]], i)

    return min(enumerate(configs), key=rank)[1]


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


def channels_contiguous(t: Tensor | None) -> Tensor | None:
    """``t`` itself when its channel axis (dim 1) has stride 1 or size 1, else a channels_last copy.

    The conv kernels walk the channel axis inside their loops. With another channel stride (NCHW, an expanded
    gradient) every operand tile would be a scalar gather (2-byte synchronous loads in 16-bit, no ``cp.async``)
    and only small tiles would fit the registers, so the launchers copy such an operand once instead: the kernels
    only ever run on channel-contiguous tensors, whatever layout the caller passes."""
    if t is None or t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def channels_contiguous_output(out: Tensor) -> Tensor:
    """Where a kernel writes ``out``: ``out`` itself when its channel stride is 1 (or it has one channel), else a
    channels_last buffer of its size and dtype, copied into ``out`` by :func:`finish_output`."""
    if out.stride(1) == 1 or out.shape[1] == 1:
        return out
    return torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=torch.channels_last)


def finish_output(out: Tensor, written: Tensor) -> Tensor:
    """``out``, after copying ``written`` (the buffer :func:`channels_contiguous_output` gave) into it."""
    if written is not out:
        out.copy_(written)
    return out


def weight_strides(strides: tuple[int, ...], kernel_size: tuple[int, int]) -> tuple[int, ...]:
    """The strides a conv kernel takes for a weight (or weight-gradient) layout whose last two axes are the kernel
    taps (KH, KW): ``strides`` as given, except that a 1-wide kernel axis gets stride 0. That axis's only tap is 0,
    so the value never addresses memory; a 1x1 weight's spatial strides are 1 in NCHW, which would hide the channel
    alignment (``channel_alignment``, and the JIT's divisibility-by-16 mark) from the compiler, while 0 shows it."""
    *lead, sh, sw = strides
    kh, kw = kernel_size
    return (*lead, 0 if kh == 1 else sh, 0 if kw == 1 else sw)


def dot_settings(dtype: torch.dtype, input_precision: str) -> dict[str, Any]:
    """Constexprs choosing the ``tl.dot`` operand dtype, accumulator dtype and fp32 input precision.

    16-bit operands stay 16-bit for the tensor cores (fp32 accumulation), except bf16 under the interpreter, which
    cannot do bf16 arithmetic: there they are upcast to fp32 right after the load. ``input_precision`` ("ieee" or
    "tf32") only matters for fp32 dots on a GPU; fp64 (for gradcheck) accumulates in fp64 with "ieee".
    """
    check_input_precision("grouped conv2d", input_precision)
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


def check_out(what: str, out: Tensor, size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != tuple(size) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{what}: out must be {tuple(size)} {dtype} on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def check_output_shaped(what: str, geom: ConvGeometry, **tensors: Tensor | None) -> None:
    """Each given tensor (the output gradient, the ReLU output) has the conv's output size."""
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != geom.output_size:
            raise ValueError(f"{what}: {name} must be {geom.output_size}, got {tuple(t.shape)}")


#: No conv config tiles pixels in blocks longer than this. A tile's indices run up to ``pixels - 1 + block``, so
#: the pixel count keeps this much headroom below 2**31.
MAX_PIXEL_BLOCK = 256


def check_int32_pixels(what: str, pixels: int, description: str) -> None:
    """The kernels index pixels in int32: ``pixels`` (described as ``description``) plus one tile's length must
    stay below 2**31, so that the last tile's indices do not wrap."""
    if pixels + MAX_PIXEL_BLOCK > 2**31:
        raise ValueError(
            f"{what}: {description} exceeds the int32 pixel index (at most 2**31 - {MAX_PIXEL_BLOCK} pixels)")


# Index helpers inlined into the three kernels (block sizes stay constexpr). Program ids, tile and group origins
# follow the conventions of the kernels' docstrings: int64 group offsets, int32 pixel indices.


@triton.jit
def tile_of(pid, N, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of program ``pid`` over an N-column output; column tiles vary fastest, so the
    programs sharing one row tile (one input tile) run together and it stays in L2."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    return pid // tiles_n, pid % tiles_n


@triton.jit
def block_range(tile, size, BLOCK: tl.constexpr):
    """The ``BLOCK`` indices of block ``tile`` along an axis of ``size`` and their in-bounds mask."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < size


@triton.jit
def split_bounds(split, SPLIT_ROWS, R):
    """``[start, end)`` of chunk ``split`` of ``R`` rows cut into chunks of ``SPLIT_ROWS``. ``start + SPLIT_ROWS``
    can pass 2**31 for the last chunk, so the end is ``start`` plus what is left, which never wraps."""
    start = split * SPLIT_ROWS
    return start, start + tl.minimum(SPLIT_ROWS, R - start)


@triton.jit
def pixel_coords(offs, H, W):
    """Flat indices of an (N, H, W) pixel grid (W fastest) -> (n as int64, row, column)."""
    w = offs % W
    h = (offs // W) % H
    n = (offs // (W * H)).to(tl.int64)
    return n, h, w


@triton.jit
def store_pixel_tile(ptr, acc, n, h, w, channels, s_n, s_c, s_h, s_w, mask_m, mask_n):
    """Store ``acc`` (BLOCK_M pixels (n, h, w) x BLOCK_N channels) into a strided (N, C, H, W) tensor, cast to its
    element type."""
    off = n * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
    ptrs = ptr + off[:, None] + (channels * s_c)[None, :]
    tl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])



@triton.jit
def store_weight_grad_partial(dw_ptr, db_ptr, acc, db_acc, split, g, COUT_G, offs_co, offs_ci, mask_co, mask_ci,
                              kh, kw, tap, pid_ci, sdw_s, sdw_o, sdw_i, sdw_h, sdw_w, sdb_s, sdb_c,
                              HAS_BIAS: tl.constexpr):
    """Store one weight-gradient tile (``acc``: BLOCK_CO x BLOCK_CI of tap (kh, kw), group g) into split
    ``split`` of the partial sums dW (S, G*COUT_G, CIN_G, KH, KW) and, once per output channel (tap 0, first
    input-channel tile), the bias partial ``db_acc`` into db (S, G*COUT_G); both cast to their element types."""
    split64 = split.to(tl.int64)
    dw_ptrs = (
        dw_ptr
        + split64 * sdw_s
        + ((g * COUT_G + offs_co) * sdw_o)[:, None]
        + (offs_ci.to(tl.int64) * sdw_i)[None, :]
        + kh * sdw_h
        + kw * sdw_w
    )
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_co[:, None] & mask_ci[None, :])
    if HAS_BIAS:
        db_ptrs = db_ptr + split64 * sdb_s + (g * COUT_G + offs_co) * sdb_c
        tl.store(db_ptrs, db_acc.to(db_ptr.dtype.element_ty), mask=mask_co & (tap == 0) & (pid_ci == 0))
