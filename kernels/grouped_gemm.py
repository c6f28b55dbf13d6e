"""Grouped GEMM: ``C[g] = A[g] @ B[g] (+ bias[g])`` for g = 0..G-1, and the grouped linear layer built on it.

One ``@triton.jit`` kernel serves all three passes of ``grouped_linear`` by addressing its operands through
explicit strides, including a group stride, so no operand is ever copied or transposed:

- forward:          ``Y[k]  = X[k] @ W[k]^T + b[k]``  (A = X, B = W^T)
- backward input:   ``dX[k] = dY[k] @ W[k]``          (A = dY, B = W)
- backward weight:  ``dW[k] = dY[k]^T @ X[k]``        (A = dY^T, B = X); ``db = dY.sum(0)`` is one torch reduction
  (fusing it as a row sum of A cost enough registers to make several configs spill).

Here ``X[k]`` is the column slice ``x[:, k*in:(k+1)*in]`` of the ``(M, K*in)`` activation; its group stride is
``in * x.stride(1)``. The group index is grid axis 1; axis 0 enumerates output tiles (L2-friendly "super-grouped"
order as in triton's matmul tutorial).

Numerics: accumulation in fp32 (fp64 for fp64 inputs, used by gradcheck under the interpreter). On a GPU, 16-bit
operands go to ``tl.dot`` as loaded (tensor cores); under ``TRITON_INTERPRET=1`` every operand is upcast right after
its load because the interpreter cannot do bf16 arithmetic. fp32 dots use ``input_precision`` "ieee" or "tf32"
(the public op follows ``torch.backends.cuda.matmul.allow_tf32``, off by default, like torch's matmul).

Glue: one ``torch.library.custom_op`` per launch (``groupnet::grouped_linear_forward``,
``..._backward_input``, ``..._backward_weight``), each with a fake, and an outer ``torch.autograd.Function``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from groupnet import _checks

from . import grouped_gemm_tma as _tma

from . import _launch_shapes
from ._common import (
    INPUT_PRECISIONS,
    TORCH_TO_TRITON_DTYPE,
    CompileSpec,
    LaunchCase,
    autotune_configs,
    check_input_precision,
    check_launch_tensors,
    default_input_precision,
    is_interpreter,
    launch,
    register_autocast_rule,
    specs_from_launches,
    tl_accumulator_dtype,
)


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=num_warps,
        num_stages=num_stages,
    )


# Tensor-core configs (fp16, bf16, fp32 with input_precision="tf32"). Every config fits sm_80's shared memory with
# fp32 operands (num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * 4 bytes) and compiles without register spills
# (python -m groupnet.kernels.report). BLOCK_M >= 64 with 4+ warps so that sm_90 can use wgmma.
TENSOR_CORE_CONFIGS = [
    _config(128, 128, 32, 8, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
    _config(64, 32, 64, 4, 4),
]
# Not in the list, for 16-bit operands: deeper K steps (128 x 128 x 64 / 8 warps, 64 x 64 x 128 / 4 warps) and a
# 128 x 256 tile. With sizes and strides that are multiples of 16 they compile without spills (162-188 registers
# on sm_80; 128 x 256: 244-250), but a launch whose sizes are not (no vectorised loads) spills on sm_80 and sm_90
# (python -m groupnet.kernels.report --modules grouped_gemm); deeper K and 256-wide tiles are on the sm_90 TMA
# kernel (grouped_gemm_tma.py), whose loads do not depend on that divisibility.
# fp32 with input_precision="ieee" (and fp64) runs on the FMA units and holds more in registers: smaller tiles.
# 64 x 64 runs on 8 warps: with 4 its weight-gradient build spilled on sm_80 when no size is a multiple of 16.
FMA_CONFIGS = [
    _config(64, 64, 32, 8, 4),
    _config(64, 32, 32, 4, 4),
    _config(32, 32, 32, 2, 4),
]
GPU_CONFIGS = TENSOR_CORE_CONFIGS + FMA_CONFIGS
MAX_BLOCK = 256  # no config has a larger tile side; bounds the int32 offsets inside a tile


def gpu_configs(dtype: str, input_precision: str) -> list[triton.Config]:
    """The GPU configs for operands of triton dtype ``dtype`` ("fp16", "bf16", "fp32", "fp64")."""
    fma = dtype == "fp64" or (dtype == "fp32" and input_precision == "ieee")
    return FMA_CONFIGS if fma else TENSOR_CORE_CONFIGS


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    allowed = gpu_configs(TORCH_TO_TRITON_DTYPE[named_args["A"].dtype], kwargs["INPUT_PRECISION"])
    return [c for c in configs if any(c is a for a in allowed)] or configs


# Small tiles under the interpreter: tests with sizes up to ~70 still cover several tiles and masked tails.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})


@triton.jit
def grouped_gemm_kernel(
    A, B, C, BIAS,
    M, N, KD, G,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_cg, stride_cm, stride_cn,
    stride_bias_g, stride_bias_n,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``C[g] = A[g] @ B[g]`` with A ``(G, M, KD)``, B ``(G, KD, N)``, C ``(G, M, N)``, all by strides.

    Args:
        A, B, C: operand pointers; element (g, i, j) of A is at ``A + g*stride_ag + i*stride_am + j*stride_ak``.
        BIAS: ``(G, N)`` added to every row of C[g] when HAS_BIAS.
        M, N, KD: sizes; KD is the reduction length. G: the group count (grid axis 1), an autotune key only.
        ACC_DTYPE: tl.float32, or tl.float64 for fp64 operands.
        UPCAST_OPERANDS: cast loaded operands to ACC_DTYPE before tl.dot (needed by the interpreter for bf16).
        INPUT_PRECISION: "ieee" or "tf32", used by fp32 dots.
        BLOCK_M, BLOCK_N, BLOCK_K: tile sizes; GROUP_M: row tiles per L2 super-group.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Group and tile origins in int64; offsets inside a tile in int32 (the launcher checks that they fit).
    # Rows/columns past the edge wrap onto valid ones (modulo what is left), so the loads need only the K mask; the
    # duplicates are dropped by the store masks. The hints say each operand index vector is BLOCK-long contiguous
    # from a multiple of BLOCK (true except in a tail tile, whose wrapped lanes only feed masked-off outputs, as in
    # triton's matmul tutorial): the compiler then vectorises the loads on whichever axis has unit stride (16-byte
    # cp.async on sm_80), which a clamp (tl.minimum) hides.
    rows_left = M - pid_m * BLOCK_M
    cols_left = N - pid_n * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_rows = tl.max_contiguous(tl.multiple_of(rows % rows_left, BLOCK_M), BLOCK_M)
    b_cols = tl.max_contiguous(tl.multiple_of(cols % cols_left, BLOCK_N), BLOCK_N)
    a_tile = A + g * stride_ag + pid_m.to(tl.int64) * BLOCK_M * stride_am
    b_tile = B + g * stride_bg + pid_n.to(tl.int64) * BLOCK_N * stride_bn
    a_ptrs = a_tile + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_tile + ks[:, None] * stride_bk + b_cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, KD, BLOCK_K):
        mask_k = ks < KD - k0
        a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = rows < rows_left
    mask_n = cols < cols_left
    if HAS_BIAS:
        bias_tile = BIAS + g * stride_bias_g + pid_n.to(tl.int64) * BLOCK_N * stride_bias_n
        bias = tl.load(bias_tile + cols * stride_bias_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_tile = C + g * stride_cg + pid_m.to(tl.int64) * BLOCK_M * stride_cm + pid_n.to(tl.int64) * BLOCK_N * stride_cn
    c_ptrs = c_tile + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Autotune keys: everything that changes the best config. The sizes other than the batch, the group count G (the
# grid's second axis: with few groups, smaller tiles fill the SMs), the dot precision, and (added by triton's
# autotuner itself for every tensor argument) the operand dtypes. cache_results: the timings are written to triton's
# cache (TRITON_CACHE_DIR), so later processes on the same machine, triton and shapes reuse the chosen config.
# Reproducible configs regardless of timing: see pinned_config.
_features_reduced_gemm = triton.autotune(
    configs=autotune_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["N", "KD", "G", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(grouped_gemm_kernel)
# dW reduces over the batch: keyed on the feature sizes (M, N) only, so a new batch size does not retune.
_batch_reduced_gemm = triton.autotune(
    configs=autotune_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["M", "N", "G", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(grouped_gemm_kernel)


def _prune_tma_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    allowed = _tma.tma_configs(TORCH_TO_TRITON_DTYPE[named_args["A"].dtype])
    return [c for c in configs if any(c is a for a in allowed)] or configs


_TMA_GPU_CONFIGS = _tma.TMA_CONFIGS_16BIT + _tma.TMA_CONFIGS_32BIT
_TMA_LAYOUT_KEYS = ["A_K_CONTIGUOUS", "B_N_CONTIGUOUS"]
_features_reduced_tma = triton.autotune(
    configs=autotune_configs(_TMA_GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["N", "KD", "G", "INPUT_PRECISION", *_TMA_LAYOUT_KEYS],
    prune_configs_by={"early_config_prune": _prune_tma_configs},
    cache_results=True,
)(_tma.grouped_gemm_tma_kernel)
_batch_reduced_tma = triton.autotune(
    configs=autotune_configs(_TMA_GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["M", "N", "G", "INPUT_PRECISION", *_TMA_LAYOUT_KEYS],
    prune_configs_by={"early_config_prune": _prune_tma_configs},
    cache_results=True,
)(_tma.grouped_gemm_tma_kernel)


def reproducible_configs() -> bool:
    """True when launches use :func:`pinned_config` instead of autotuning: under
    ``torch.use_deterministic_algorithms(True)``."""
    return torch.are_deterministic_algorithms_enabled()


def pinned_config(dtype: torch.dtype, input_precision: str, m: int, n: int, *, tma: bool = False) -> triton.Config:
    """The config a launch of output size ``(M, N)`` uses when configs are pinned: a function of the dtype, the
    precision, the output size and the kernel (cp.async or TMA) only, never of timings.

    Under the interpreter: its one config. On a GPU: the largest square-ish tile of the pass's config list that the
    output fills (128 rows/columns when M/N reach 128, else 64), BLOCK_K from that list.
    """
    if is_interpreter():
        return INTERPRETER_CONFIG
    tl_dtype = TORCH_TO_TRITON_DTYPE[dtype]
    configs = _tma.tma_configs(tl_dtype) if tma else gpu_configs(tl_dtype, input_precision)
    want_m = 128 if m >= 128 else 64
    want_n = 128 if n >= 128 else 64
    for cfg in configs:
        if cfg.kwargs["BLOCK_M"] == want_m and cfg.kwargs["BLOCK_N"] == want_n:
            return cfg
    return min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])


def launch_grouped_gemm(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    *,
    bias: Tensor | None = None,
    input_precision: str = "ieee",
    batch_reduction: bool = False,
    config: triton.Config | None = None,
    tma: bool | None = None,
) -> Tensor:
    """Write ``out[g] = a[g] @ b[g] (+ bias[g])`` into ``out``.

    Args:
        a: ``(G, M, KD)``; b: ``(G, KD, N)``; out: ``(G, M, N)``. Any strides (views are fine; ``out`` must not
            overlap the inputs).
        bias: ``(G, N)`` or None.
        input_precision: "ieee" or "tf32" (fp32 dots on a GPU).
        batch_reduction: True when KD is the batch (the dW pass): picks the autotuner keyed on M and N.
        config: launch with this config instead of autotuning (used by benchmarks and tests). None: autotune, or
            :func:`pinned_config` when :func:`reproducible_configs`.
        tma: True runs the TMA kernel (``grouped_gemm_tma.py``; an error when the operands do not meet TMA's
            alignment rules), False the cp.async kernel; None picks TMA on a CUDA device of capability >= 9 whose
            operands qualify (:func:`groupnet.kernels.grouped_gemm_tma.tma_layouts`), else cp.async.

    Returns:
        ``out``.
    """
    what = "launch_grouped_gemm"
    for name, t in (("a", a), ("b", b), ("out", out)):
        if t.dim() != 3:
            raise ValueError(f"{what}: {name} must be 3-d (groups, rows, cols), got shape {tuple(t.shape)}")
    g, m, kd = a.shape
    n = b.shape[2]
    if tuple(b.shape) != (g, kd, n) or tuple(out.shape) != (g, m, n):
        raise ValueError(
            f"{what}: expected a (G, M, KD), b (G, KD, N), out (G, M, N); got a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}, out {tuple(out.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (g, n):
        raise ValueError(f"{what}: bias must have shape {(g, n)}, got {tuple(bias.shape)}")
    check_launch_tensors(what, a.dtype, a=a, b=b, out=out, bias=bias)
    check_input_precision(what, input_precision)
    for name, t in (("a", a), ("b", b), ("out", out), ("bias", bias)):
        if t is not None and max(t.stride()[1:], default=0) * MAX_BLOCK >= 2**31:
            raise ValueError(
                f"{what}: {name} has strides {t.stride()}; offsets inside a tile are int32, so row/column strides "
                f"must be < 2**31 / {MAX_BLOCK}"
            )
    if g == 0 or m == 0 or n == 0:
        return out

    bias_t, bias_strides = (bias, bias.stride()) if bias is not None else (out, (0, 0))  # out: never read

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), g)

    args = (
        a, b, out, bias_t,
        m, n, kd, g,
        *a.stride(), *b.stride(), *out.stride(), *bias_strides,
    )  # fmt: skip
    constexprs = {
        "HAS_BIAS": bias is not None,
        "ACC_DTYPE": tl_accumulator_dtype(a.dtype),
        "UPCAST_OPERANDS": is_interpreter(),
        "INPUT_PRECISION": input_precision,
    }
    layouts = _tma.tma_layouts(a, b) if kd > 0 else None  # a TMA descriptor cannot describe an empty axis
    if tma is None:
        tma = layouts is not None and a.device.type == "cuda" and torch.cuda.get_device_capability(a.device)[0] >= 9
    elif tma and layouts is None:
        raise ValueError(
            f"{what}: tma=True needs fp16/bf16/fp32 operands with a unit stride each, the other strides and the group "
            f"stride multiples of 16 bytes and 16-byte-aligned addresses; got a strides {a.stride()}, b strides "
            f"{b.stride()}, dtype {a.dtype}"
        )
    if config is None and reproducible_configs():
        config = pinned_config(a.dtype, input_precision, m, n, tma=tma)
    if tma:
        constexprs["A_K_CONTIGUOUS"], constexprs["B_N_CONTIGUOUS"] = layouts
        if a.device.type == "cuda":
            _tma.set_scratch_allocator()  # device-side descriptors live in global scratch memory
        kernel = _batch_reduced_tma if batch_reduction else _features_reduced_tma
    else:
        kernel = _batch_reduced_gemm if batch_reduction else _features_reduced_gemm
    # With a fixed config, launch() runs the raw kernel (the autotuner's .fn) with it.
    launch(kernel, grid, args, constexprs, config)
    return out


def _groups(t: Tensor, k: int) -> Tensor:
    """``(M, K*F)`` -> the ``(K, M, F)`` view whose [k] is the column slice of branch k."""
    return t.unflatten(1, (k, -1)).transpose(0, 1)


def forward_into(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, out: Tensor, input_precision: str = "ieee"
) -> Tensor:
    """``out[:, k*o:(k+1)*o] = x[:, k*i:(k+1)*i] @ weight[k]^T + bias[k]`` with ``out`` ``(M, K*o)``, any strides."""
    k = weight.shape[0]
    launch_grouped_gemm(
        _groups(x, k), weight.transpose(1, 2), _groups(out, k), bias=bias, input_precision=input_precision
    )
    return out


def backward_input_into(grad_y: Tensor, weight: Tensor, *, out: Tensor, input_precision: str = "ieee") -> Tensor:
    """``out[:, k*i:(k+1)*i] = grad_y[:, k*o:(k+1)*o] @ weight[k]`` with ``out`` ``(M, K*i)``, any strides."""
    k = weight.shape[0]
    launch_grouped_gemm(_groups(grad_y, k), weight, _groups(out, k), input_precision=input_precision)
    return out


def backward_weight_into(grad_y: Tensor, x: Tensor, *, out: Tensor, input_precision: str = "ieee") -> Tensor:
    """``out[k] = grad_y[:, k*o:(k+1)*o]^T @ x[:, k*i:(k+1)*i]`` with ``out`` ``(K, o, i)``, any strides."""
    k, out_f, _ = out.shape
    grad_y_t = grad_y.unflatten(1, (k, out_f)).permute(1, 2, 0)  # (K, out, M)
    launch_grouped_gemm(grad_y_t, _groups(x, k), out, input_precision=input_precision, batch_reduction=True)
    return out


@torch.library.custom_op("groupnet::grouped_linear_forward", mutates_args=())
def grouped_linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, input_precision: str) -> Tensor:
    """The forward of :func:`grouped_linear` into a new contiguous ``(M, K*out)`` tensor."""
    y = x.new_empty((x.shape[0], weight.shape[0] * weight.shape[1]))
    return forward_into(x, weight, bias, out=y, input_precision=input_precision)


@grouped_linear_forward.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, input_precision: str) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0] * weight.shape[1]))


register_autocast_rule("groupnet::grouped_linear_forward")


@torch.library.custom_op("groupnet::grouped_linear_backward_input", mutates_args=())
def grouped_linear_backward_input(grad_y: Tensor, weight: Tensor, input_precision: str) -> Tensor:
    """The input gradient of :func:`grouped_linear` ``(M, K*in)`` (grad_y may have any strides, even 0)."""
    grad_x = grad_y.new_empty((grad_y.shape[0], weight.shape[0] * weight.shape[2]))
    return backward_input_into(grad_y, weight, out=grad_x, input_precision=input_precision)


@grouped_linear_backward_input.register_fake
def _(grad_y: Tensor, weight: Tensor, input_precision: str) -> Tensor:
    return grad_y.new_empty((grad_y.shape[0], weight.shape[0] * weight.shape[2]))


@torch.library.custom_op("groupnet::grouped_linear_backward_weight", mutates_args=())
def grouped_linear_backward_weight(
    grad_y: Tensor, x: Tensor, branches: int, input_precision: str
) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of :func:`grouped_linear`: ``(K, out, in)`` and ``(K, out)`` (db is one torch reduction)."""
    out_f, in_f = grad_y.shape[1] // branches, x.shape[1] // branches
    grad_w = x.new_empty((branches, out_f, in_f))
    backward_weight_into(grad_y, x, out=grad_w, input_precision=input_precision)
    return grad_w, grad_y.sum(0).view(branches, out_f)


@grouped_linear_backward_weight.register_fake
def _(grad_y: Tensor, x: Tensor, branches: int, input_precision: str) -> tuple[Tensor, Tensor]:
    out_f, in_f = grad_y.shape[1] // branches, x.shape[1] // branches
    return x.new_empty((branches, out_f, in_f)), x.new_empty((branches, out_f))


class GroupedLinearFunction(torch.autograd.Function):
    """Autograd for :func:`grouped_linear` over the three custom ops (first derivatives only)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, input_precision: str) -> Tensor:
        return torch.ops.groupnet.grouped_linear_forward(x, weight, bias, input_precision)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, input_precision = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.input_precision = input_precision

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.groupnet.grouped_linear_backward_input(grad_y, weight, ctx.input_precision)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = torch.ops.groupnet.grouped_linear_backward_weight(
                grad_y, x, weight.shape[0], ctx.input_precision
            )
            grad_w = grad_w if ctx.needs_input_grad[1] else None
            grad_b = grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def grouped_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, input_precision: str | None = None
) -> Tensor:
    """K independent linear maps on branch-stacked features with the Triton grouped GEMM.

    The entry for direct callers: it validates every argument, then runs :func:`run_grouped_linear`
    (``groupnet.ops.grouped_linear`` validates once itself and calls that directly).

    Args:
        x: ``(M, K*in)``, any strides; branch k reads columns ``[k*in, (k+1)*in)``.
        weight: ``(K, out, in)``.
        bias: ``(K, out)`` or None.
        input_precision: "ieee" or "tf32" for fp32 dots on a GPU; None follows
            ``torch.backends.cuda.matmul.allow_tf32`` (off by default, so "ieee").

    Returns:
        ``(M, K*out)``, contiguous.

    Under ``torch.autocast`` the operands are cast as for ``nn.Linear`` (``_checks.autocast_inputs``).
    """
    if isinstance(x, Tensor):
        x, weight, bias = _checks.autocast_inputs(x.device.type, x, weight, bias)
    _checks.check_rank(x, 2, "grouped_linear (Triton)")
    _checks.check_linear_args(x, weight, bias)
    return run_grouped_linear(x, weight, bias, input_precision=input_precision)


def run_grouped_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, input_precision: str | None = None
) -> Tensor:
    """:func:`grouped_linear` on a 2-d ``x`` and arguments the caller has validated (shapes, K).

    The precision is resolved and checked here; the launcher checks what protects memory (dtypes, devices, operand
    sizes, int32 in-tile offsets).
    """
    precision = default_input_precision("matmul") if input_precision is None else input_precision
    check_input_precision("grouped_linear", precision)
    return GroupedLinearFunction.apply(x, weight, bias, precision)


# The JIT specializes unit strides to constexpr 1; with contiguous x, weight and grads each pass has its own:
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def launch_cases() -> list[LaunchCase]:
    """The three passes of every classifier of ``kernels/_launch_shapes.py`` x dtype variant, run through the custom
    ops' own bodies on meta tensors (x ``(M, K*in)``, weight ``(K, out, in)``, bias ``(K, out)``, all contiguous)."""
    cases = []
    for dtype, precision in _launch_shapes.DTYPE_VARIANTS:
        t = _TORCH_DTYPES[dtype]
        for shape in _launch_shapes.LINEAR_SHAPES:
            k, m = shape.branches, _launch_shapes.BATCH
            x = torch.empty(m, k * shape.in_features, dtype=t, device="meta")
            w = torch.empty(k, shape.out_features, shape.in_features, dtype=t, device="meta")
            b = torch.empty(k, shape.out_features, dtype=t, device="meta")
            dy = torch.empty(m, k * shape.out_features, dtype=t, device="meta")
            variant = f"{dtype}{'_' + precision if dtype == 'fp32' else ''}"
            where = f"{shape.model}/K{k} {shape.in_features}->{shape.out_features} M{m}"
            runs = {
                "forward": lambda x=x, w=w, b=b, p=precision: grouped_linear_forward._init_fn(x, w, b, p),
                "backward_input": lambda dy=dy, w=w, p=precision: grouped_linear_backward_input._init_fn(dy, w, p),
                "backward_weight": lambda dy=dy, x=x, k=k, p=precision: grouped_linear_backward_weight._init_fn(
                    dy, x, k, p),
            }
            cases += [LaunchCase(f"{p} {variant} {where}", p, run, variant) for p, run in runs.items()]
    return cases


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """The distinct JIT specializations x autotune configs of :func:`launch_cases` (kernels/report.py)."""
    return specs_from_launches("grouped_gemm", launch_cases())


class LinearWorkload(NamedTuple):
    """One grouped linear launch shape for the roofline estimates: K branches, M rows, per-branch in/out features."""

    name: str
    branches: int
    rows: int
    in_features: int
    out_features: int


_BYTES_PER_ELEMENT = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}


def roofline_cases(workloads: Sequence[LinearWorkload]) -> list[dict]:
    """Forward, dX and dW launches of each workload, bf16 and fp32 (which shapes: the caller's choice;
    ``python -m groupnet.roofline`` takes them from the model zoo)."""
    cases = []
    for wl in workloads:
        k, m, in_f, out_f = wl.branches, wl.rows, wl.in_features, wl.out_features
        flops = 2.0 * k * m * in_f * out_f
        x, w, b, y = m * k * in_f, k * out_f * in_f, k * out_f, m * k * out_f
        elements = {"forward": x + w + b + y, "backward_input": y + w + x, "backward_weight": y + x + w}
        for dtype in ("bf16", "fp32"):
            for pass_name, count in elements.items():
                cases.append(
                    {
                        "name": f"{pass_name} K={k} M={m} in={in_f} out={out_f}",
                        "flops": flops,
                        "bytes": float(count * _BYTES_PER_ELEMENT[dtype]),
                        "dtype": dtype,
                        "notes": wl.name
                        + ("; db = dY.sum(0) is a separate torch reduction" if pass_name == "backward_weight" else ""),
                    }
                )
    return cases
