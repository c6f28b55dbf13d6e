"""Grouped GEMM with TMA loads (sm_90+): ``C[g] = A[g] @ B[g] (+ bias[g])``, the same contract as
:func:`groupnet.kernels.grouped_gemm.grouped_gemm_kernel`.

Each program builds device-side tensor descriptors (``tl.make_tensor_descriptor``) for its group's A and B, one per
group as in triton's grouped-GEMM tutorial (TMA variant), and loads its tiles with them: on sm_90 the loads become
``cp.async.bulk.tensor`` (TMA: one thread issues a whole tile copy, the hardware computes addresses and zero-fills
out-of-bounds rows/columns, so no masks and no clamping) and the dots asynchronous ``wgmma``.

TMA needs, per operand: a unit stride on one axis (the descriptor's last dimension), the other stride and the group
stride multiples of 16 bytes, and a 16-byte-aligned base (:func:`tma_compatible`). The launcher in
``grouped_gemm.py`` picks this kernel on capability >= 9 when all operands qualify, else the cp.async kernel. A
descriptor built on the device lives in global scratch memory that triton asks for at launch:
:func:`set_scratch_allocator` installs a torch allocator for it.

The output and the bias go through ordinary masked pointer stores/loads (C may have any strides).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor

from ._common import CompileSpec


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=num_warps,
        num_stages=num_stages,
    )


# sm_90 configs (wgmma wants BLOCK_M a multiple of 64 with 4 warps per 64 rows). Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K * element bytes; 16-bit configs fit 232 KB with their stages, fp32 (tf32) gets the
# half-size ones (pruned by element size in the launcher).
TMA_CONFIGS_16BIT = [
    _config(128, 256, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
]
TMA_CONFIGS_32BIT = [
    _config(128, 128, 32, 8, 3),
    _config(64, 64, 32, 4, 4),
]
TMA_DTYPES = ("fp16", "bf16", "fp32")
"""Operand types of the TMA path (fp64 only runs under the interpreter, on the cp.async kernel)."""


@triton.jit
def grouped_gemm_tma_kernel(
    A, B, C, BIAS,
    M, N, KD, G,
    stride_ag, stride_am, stride_ak,
    stride_bg, stride_bk, stride_bn,
    stride_cg, stride_cm, stride_cn,
    stride_bias_g, stride_bias_n,
    A_K_CONTIGUOUS: tl.constexpr,
    B_N_CONTIGUOUS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """``C[g] = A[g] @ B[g]`` like ``grouped_gemm_kernel``, operands read through per-group TMA descriptors.

    A_K_CONTIGUOUS: A's unit stride is on the K axis (``stride_ak == 1``, a row-major ``(M, KD)`` tile), else on
    the M axis (``stride_am == 1``; the descriptor covers ``(KD, M)`` and tiles are transposed after the load).
    B_N_CONTIGUOUS: B's unit stride is on the N axis, else on the K axis (descriptor over ``(N, KD)``).
    G: the group count (grid axis 1); an autotune key.
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
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    if A_K_CONTIGUOUS:
        a_desc = tl.make_tensor_descriptor(
            A + g * stride_ag, shape=[M, KD], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
    else:
        a_desc = tl.make_tensor_descriptor(
            A + g * stride_ag, shape=[KD, M], strides=[stride_ak, 1], block_shape=[BLOCK_K, BLOCK_M]
        )
    if B_N_CONTIGUOUS:
        b_desc = tl.make_tensor_descriptor(
            B + g * stride_bg, shape=[KD, N], strides=[stride_bk, 1], block_shape=[BLOCK_K, BLOCK_N]
        )
    else:
        b_desc = tl.make_tensor_descriptor(
            B + g * stride_bg, shape=[N, KD], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, KD, BLOCK_K):
        if A_K_CONTIGUOUS:
            a = a_desc.load([off_m, k0])
        else:
            a = a_desc.load([k0, off_m]).T
        if B_N_CONTIGUOUS:
            b = b_desc.load([k0, off_n])
        else:
            b = b_desc.load([off_n, k0]).T
        if UPCAST_OPERANDS:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M - off_m
    mask_n = cols < N - off_n
    if HAS_BIAS:
        bias_tile = BIAS + g * stride_bias_g + off_n.to(tl.int64) * stride_bias_n
        bias = tl.load(bias_tile + cols * stride_bias_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_tile = C + g * stride_cg + off_m.to(tl.int64) * stride_cm + off_n.to(tl.int64) * stride_cn
    c_ptrs = c_tile + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _operand_layout(t: Tensor, inner_first: bool) -> bool | None:
    """For a ``(G, R, S)`` operand: True when its unit stride is on axis 2 (S), False on axis 1 (R), None when TMA
    cannot read it (no unit stride, or the other stride / the group stride / the address not 16-byte aligned).
    ``inner_first``: which axis to prefer when both have unit stride (a size-1 axis)."""
    e = t.element_size()
    _, s_r, s_s = t.stride()
    candidates = [(True, s_s, s_r), (False, s_r, s_s)]
    if not inner_first:
        candidates.reverse()
    if t.data_ptr() % 16 or (t.shape[0] > 1 and (t.stride(0) * e) % 16):
        return None
    for on_last, unit, other in candidates:
        if unit == 1 and (other * e) % 16 == 0 and other > 0:
            return on_last
    return None


def tma_layouts(a: Tensor, b: Tensor) -> tuple[bool, bool] | None:
    """``(A_K_CONTIGUOUS, B_N_CONTIGUOUS)`` when TMA descriptors can read ``a`` ``(G, M, KD)`` and ``b`` ``(G, KD, N)``
    (see :func:`_operand_layout`), else None."""
    from ._common import TORCH_TO_TRITON_DTYPE

    if TORCH_TO_TRITON_DTYPE.get(a.dtype) not in TMA_DTYPES:
        return None
    a_k = _operand_layout(a, inner_first=True)
    b_n = _operand_layout(b, inner_first=True)
    if a_k is None or b_n is None:
        return None
    return a_k, b_n


def tma_compatible(a: Tensor, b: Tensor) -> bool:
    """True when the TMA kernel can read both operands (16-byte alignment rules, a unit stride each)."""
    return tma_layouts(a, b) is not None


def set_scratch_allocator() -> None:
    """Install a torch-backed allocator for the global scratch memory of device-side TMA descriptors
    (``triton.set_allocator``; a context variable, so it is set in the launching thread's context)."""
    triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream: int | None):
    import torch

    return torch.empty(size, device="cuda", dtype=torch.int8)


# The JIT makes unit strides constexpr 1. Per pass with contiguous tensors (see grouped_gemm.UNIT_STRIDES):
# forward A = x_k (K-contiguous), B = W_k^T (K-contiguous); dX A = dY_k (K), B = W_k (N);
# dW A = dY_k^T (M), B = x_k (N).
PASS_LAYOUTS = {
    "forward": (True, False, ("stride_ak", "stride_bk", "stride_cn", "stride_bias_n")),
    "backward_input": (True, True, ("stride_ak", "stride_bn", "stride_cn")),
    "backward_weight": (False, True, ("stride_am", "stride_bn", "stride_cn")),
}


@dataclass(frozen=True)
class TmaCompileSpec(CompileSpec):
    """A spec that also marks every int argument divisible by 16, as the JIT does for a real launch whose sizes and
    strides are multiples of 16 (the shapes TMA is picked for). ``capabilities``: the targets the launcher runs the
    kernel on (a compile report may skip the others; on sm_80 descriptor loads lower to ordinary loads)."""

    capabilities: tuple[int, ...] = (90,)

    def attrs(self) -> dict:
        names = self.fn.arg_names
        return {
            (names.index(name),): [["tt.divisibility", 16]]
            for name, ty in self.signature.items()
            if ty.startswith("*") or ty == "i32"
        }


def aligned_spec(
    kernel, config: triton.Config, dtype: str, pass_name: str, input_precision: str, extra: dict | None = None
) -> TmaCompileSpec:
    """One pass of grouped_linear on ``kernel`` (this module's or ``grouped_gemm.grouped_gemm_kernel``, which take
    the same arguments) with contiguous tensors of 16-multiple sizes; ``extra``: further constexprs."""
    _a_k, _b_n, unit = PASS_LAYOUTS[pass_name]
    constexprs = dict(
        config.kwargs,
        **(extra or {}),
        HAS_BIAS=pass_name == "forward",
        ACC_DTYPE=tl.float32,
        UPCAST_OPERANDS=False,
        INPUT_PRECISION=input_precision,
    )
    constexprs.update({name: 1 for name in unit})
    cfg = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    precision = f"_{input_precision}" if dtype == "fp32" else ""
    return TmaCompileSpec.for_config(
        f"{kernel.__name__.removesuffix('_kernel')}_{pass_name}_{dtype}{precision}_{cfg}",
        kernel,
        config,
        dtype,
        pointers={p: f"*{dtype}" for p in ("A", "B", "C", "BIAS")},
        constexprs=constexprs,
    )


def tma_spec(config: triton.Config, dtype: str, pass_name: str, input_precision: str) -> TmaCompileSpec:
    """One pass of grouped_linear on the TMA kernel with contiguous tensors of 16-multiple sizes."""
    a_k, b_n, _unit = PASS_LAYOUTS[pass_name]
    return aligned_spec(
        grouped_gemm_tma_kernel, config, dtype, pass_name, input_precision,
        {"A_K_CONTIGUOUS": a_k, "B_N_CONTIGUOUS": b_n},
    )  # fmt: skip


def tma_configs(dtype: str) -> list[triton.Config]:
    return TMA_CONFIGS_32BIT if dtype == "fp32" else TMA_CONFIGS_16BIT


def sm90_compile_specs() -> list[TmaCompileSpec]:
    """Each pass x (bf16, fp16, fp32-tf32) x each TMA config: the builds the sm_90 launcher can pick."""
    return [
        tma_spec(cfg, dtype, pass_name, precision)
        for pass_name in PASS_LAYOUTS
        for dtype, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"))
        for cfg in tma_configs(dtype)
    ]


def compile_specs() -> list[TmaCompileSpec]:
    """The offline compile check's specs (``python -m groupnet.kernels.report``): :func:`sm90_compile_specs`. On
    sm_80 the same source lowers descriptor loads to ordinary loads; the launcher never picks it there."""
    return sm90_compile_specs()
