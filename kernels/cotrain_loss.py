"""Fused co-training loss: every branch's cross-entropy, the divergence among the K branches, and the gradient
w.r.t. the logits, in one launch (one program per sample), or, for few samples with many classes, three launches
with each sample's classes split into chunks (one program per sample and chunk; see ``_launch_split``).

Per sample n with logits ``z_k`` (k < K, C classes each), targets ``y`` (index) or ``q`` (soft, ``(C,)``),
weight ``lam`` and temperature ``T``::

    P_k = softmax(z_k)                    (cross-entropy, always at T = 1)
    p_k = softmax(z_k / T),  m = mean_k p_k   (divergence)
    ce_k = -sum_c q_c log P_k,c           (q = onehot(y) for hard targets)
    js:  D = (1/K) sum_k KL(p_k || m)  = H(m) - mean_k H(p_k)
    kl:  D = 1/(K-1) sum_{i != j} KL(p_j.detach() || p_i)   (SplitNet's ``kl_seperate``; 0 when K = 1)
    loss_n = sum_k ce_k + lam * T^2 * D

Closed-form gradients (written in the forward pass, into a new fp32/fp64 buffer; backward only scales it by the
incoming per-sample gradient, with no host sync)::

    d ce_k / d z_k = P_k * sum_c q_c - q
    js: d D / d z_k = (1/(K T)) p_k (log p_k - log m - KL(p_k || m))
    kl: d D / d z_k = K / ((K-1) T) (p_k - m)      (the teacher side p_j detached)

The kernel covers both divergences. Large C is handled with an online log-sum-exp over chunks of BLOCK_C classes
(three passes over the row: log-sum-exp, divergence statistics, gradient). Logits may be fp16/bf16/fp32 (upcast
to fp32 after the load) or fp64 (fp64 arithmetic). The scalars ``weight`` and ``temperature`` enter the kernel as
fp32. A hard target outside ``[0, C)`` that is not ``ignore_index`` makes that sample's outputs NaN (no
out-of-bounds read); rows whose target is ``ignore_index`` produce zeros everywhere.

Costs and limits: the gradient buffer (N*K*C fp32, fp64 for fp64 logits) is kept from forward to backward even for
16-bit logits, so the final cast to the logits' dtype happens after the scaling by the incoming gradient (as an
fp32 loss under autocast would). Forward-mode AD, double backward and ``torch.func.vmap`` are not supported;
``torch.compile`` (fullgraph) traces through the custom op. At most ``MAX_BRANCHES`` branches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from groupnet._checks import DIVERGENCES

from ._common import (
    TORCH_TO_TRITON_DTYPE,
    CompileSpec,
    LaunchCase,
    accumulator_dtype,
    check_launch_tensors,
    launch,
    multiprocessor_count,
    specs_from_launches,
    tl_accumulator_dtype,
)

MAX_BRANCHES = 128
"""Largest K the kernel takes: a [BLOCK_K, 16] tile must fit the register budget (checked by compile_specs())."""
_MAX_TILE = {torch.float64: 1024}  # elements of one [BLOCK_K, BLOCK_C] tile; fp64 keeps ptxas under 255 registers
_DEFAULT_MAX_TILE = 2048  # 4096 spilled registers on sm_80 (K=8, fp16)
_MIN_BLOCK_C = 16


@triton.jit
def _log_mean_exp_over_branches(log_p, c_mask, log_k):
    """log m = log mean_k p_k per class, from log p (-inf on masked lanes); finite garbage on masked classes."""
    col_max = tl.max(log_p, axis=0)
    col_max = tl.where(c_mask, col_max, 0.0)
    col_sum = tl.sum(tl.exp(log_p - col_max[None, :]), axis=0)
    return col_max + tl.log(tl.where(c_mask, col_sum, 1.0)) - log_k


@triton.jit
def _store_logit_grads(
    grad_row, logits_row, targets_ptr, row, stride_tn, y, q_sum, c_lo, c_hi, cols, k_mask, row_max, log_sum_1,
    log_sum_t, t, div_stat, div_grad_scale, log_k, k_float, nan_if_bad,
    SOFT_TARGETS: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """d loss_n / d logits for classes [c_lo, c_hi) of one sample (``y``/``q_sum`` unused by the other target kind)."""
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = c0 + cols
        c_mask = cs < c_hi
        mask = k_mask[:, None] & c_mask[None, :]
        z = tl.load(logits_row + cs[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        shifted = z - row_max[:, None]
        prob_1 = tl.exp(shifted - log_sum_1[:, None])
        log_p = tl.where(mask, shifted / t - log_sum_t[:, None], float("-inf"))
        p = tl.exp(log_p)
        if SOFT_TARGETS:
            q = tl.load(targets_ptr + row * stride_tn + cs, mask=c_mask, other=0.0).to(ACC_DTYPE)
            grad_ce = prob_1 * q_sum - q[None, :]
        else:
            grad_ce = prob_1 - tl.where(cs == y, 1.0, 0.0).to(ACC_DTYPE)[None, :]
        if DIVERGENCE == 0:
            log_m = _log_mean_exp_over_branches(log_p, c_mask, log_k)
            grad_div = p * (tl.where(mask, log_p - log_m[None, :], 0.0) - div_stat[:, None])
        else:
            grad_div = p - tl.sum(p, axis=0)[None, :] / k_float
        grad = grad_ce + div_grad_scale * grad_div + nan_if_bad
        tl.store(grad_row + cs[None, :], grad, mask=mask)


@triton.jit
def _cotrain_loss_kernel(
    loss_ptr,  # (N,) per-sample loss_n
    ce_ptr,  # (N, K) contiguous, per-sample ce_k
    div_ptr,  # (N,) per-sample T^2 * D
    grad_ptr,  # d loss_n / d logits, class stride 1 (unused when not COMPUTE_GRAD)
    stride_gn,
    stride_gk,
    logits_ptr,  # class stride 1
    stride_ln,
    stride_lk,
    targets_ptr,  # (N,) int class indices, or (N, C) soft targets with class stride 1
    stride_tn,
    n_classes,
    n_branches,
    weight,
    temperature,
    ignore_index,
    SOFT_TARGETS: tl.constexpr,
    DIVERGENCE: tl.constexpr,  # 0: "js", 1: "kl"
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < n_branches
    cols = tl.arange(0, BLOCK_C)
    logits_row = logits_ptr + row * stride_ln + ks.to(tl.int64)[:, None] * stride_lk  # [BLOCK_K, 1]
    grad_row = grad_ptr + row * stride_gn + ks.to(tl.int64)[:, None] * stride_gk
    zero_k = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)

    if not SOFT_TARGETS:
        y = tl.load(targets_ptr + row * stride_tn).to(tl.int64)
        if y == ignore_index:
            tl.store(loss_ptr + row, tl.sum(zero_k, axis=0))
            tl.store(div_ptr + row, tl.sum(zero_k, axis=0))
            tl.store(ce_ptr + row * n_branches + ks, zero_k, mask=k_mask)
            if COMPUTE_GRAD:
                for c0 in range(0, n_classes, BLOCK_C):
                    cs = c0 + cols
                    mask = k_mask[:, None] & (cs < n_classes)[None, :]
                    tl.store(grad_row + cs[None, :], tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE), mask=mask)
            return
        bad_target = (y < 0) | (y >= n_classes)
        y = tl.where(bad_target, 0, y)
        nan_if_bad = tl.where(bad_target, float("nan"), 0.0).to(ACC_DTYPE)
    else:
        nan_if_bad = tl.sum(zero_k, axis=0)
        y = row  # unused with soft targets

    # Scalars as ACC_DTYPE tensors; "zeros + x" works both compiled (x a typed scalar, or a constexpr if triton
    # specialised it) and in the interpreter (x a Python number).
    t = tl.zeros([], dtype=ACC_DTYPE) + temperature
    lam = tl.zeros([], dtype=ACC_DTYPE) + weight
    k_float = tl.zeros([], dtype=ACC_DTYPE) + n_branches
    if DIVERGENCE == 0:
        div_scale = 1.0 / k_float
    else:
        div_scale = tl.where(k_float > 1.0, k_float / tl.maximum(k_float - 1.0, 1.0), 0.0)
    log_k = tl.log(k_float)

    # Pass 1: online log-sum-exp of z_k (for CE) and of z_k / T (for the divergence); one running max serves both
    # because max(z / T) = max(z) / T for T > 0. Padded branch rows keep max = -inf and sum = 0.
    run_max = tl.full([BLOCK_K], float("-inf"), ACC_DTYPE)
    sum_1 = zero_k
    sum_t = zero_k
    for c0 in range(0, n_classes, BLOCK_C):
        cs = c0 + cols
        mask = k_mask[:, None] & (cs < n_classes)[None, :]
        z = tl.load(logits_row + cs[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = run_max - safe_max
        shifted = z - safe_max[:, None]
        sum_1 = sum_1 * tl.exp(rescale) + tl.sum(tl.exp(shifted), axis=1)
        sum_t = sum_t * tl.exp(rescale / t) + tl.sum(tl.exp(shifted / t), axis=1)
        run_max = new_max
    # log-softmax is formed as (z - max) - log(sum), never as z - lse: with |z| ~ 1e4 an fp32 lse is quantised to
    # ~1e-3, which would become a 1e-3 relative error of every probability.
    row_max = tl.where(k_mask, run_max, 0.0)
    log_sum_1 = tl.log(tl.where(k_mask, sum_1, 1.0))
    log_sum_t = tl.log(tl.where(k_mask, sum_t, 1.0))

    # Pass 2: per-branch divergence statistic (js: KL(p_k || m); kl: sum_c (p_k - m) log p_k) and, for soft
    # targets, the CE as sum_c q_c (max - z_c + log sum) (each term >= 0, no cancellation of two large sums).
    div_stat = zero_k
    ce = zero_k
    q_sum = tl.sum(zero_k, axis=0)
    for c0 in range(0, n_classes, BLOCK_C):
        cs = c0 + cols
        c_mask = cs < n_classes
        mask = k_mask[:, None] & c_mask[None, :]
        z = tl.load(logits_row + cs[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        log_p = tl.where(mask, (z - row_max[:, None]) / t - log_sum_t[:, None], float("-inf"))
        p = tl.exp(log_p)
        if DIVERGENCE == 0:
            log_m = _log_mean_exp_over_branches(log_p, c_mask, log_k)
            term = p * tl.where(mask, log_p - log_m[None, :], 0.0)
        else:
            term = (p - tl.sum(p, axis=0)[None, :] / k_float) * tl.where(mask, log_p, 0.0)
        div_stat += tl.sum(term, axis=1)
        if SOFT_TARGETS:
            q = tl.load(targets_ptr + row * stride_tn + cs, mask=c_mask, other=0.0).to(ACC_DTYPE)
            q_sum += tl.sum(q, axis=0)
            ce += tl.sum(tl.where(mask, q[None, :] * ((row_max[:, None] - z) + log_sum_1[:, None]), 0.0), axis=1)

    if not SOFT_TARGETS:
        z_y = tl.load(logits_ptr + row * stride_ln + ks.to(tl.int64) * stride_lk + y, mask=k_mask, other=0.0)
        ce = tl.where(k_mask, (row_max - z_y.to(ACC_DTYPE)) + log_sum_1, 0.0)
    ce += nan_if_bad
    div = t * t * div_scale * tl.sum(div_stat, axis=0) + nan_if_bad
    tl.store(ce_ptr + row * n_branches + ks, ce, mask=k_mask)
    tl.store(div_ptr + row, div)
    tl.store(loss_ptr + row, tl.sum(tl.where(k_mask, ce, 0.0), axis=0) + lam * div)

    # Pass 3: the gradient of loss_n w.r.t. this row's logits.
    if COMPUTE_GRAD:
        _store_logit_grads(
            grad_row, logits_row, targets_ptr, row, stride_tn, y, q_sum, 0, n_classes, cols, k_mask, row_max,
            log_sum_1, log_sum_t, t, div_stat, lam * t * div_scale, log_k, k_float, nan_if_bad,
            SOFT_TARGETS, DIVERGENCE, BLOCK_C, ACC_DTYPE,
        )

# ---------------------------------------------------------------------------------------------------------------
# Class-split path: with few samples and many classes one program per sample leaves most SMs idle (N = 64 fills 64
# of 132), so the class axis is cut into S chunks of whole BLOCK_C blocks and each (sample, chunk) gets a program.
# The row statistics that the single-program kernel carries from one pass to the next become per-chunk partials in
# a small workspace, combined by every program of the next launch (atomic-free, in chunk order, so the result does
# not depend on scheduling):
#   1. _split_stats_kernel:  per chunk, per branch: running max, sum exp(z - max), sum exp((z - max) / T).
#   2. _split_div_kernel:    combine 1 (log-sum-exp merge over chunks); per chunk: the divergence statistic and,
#                            for soft targets, the CE and sum q.
#   3. _split_finish_kernel: combine 1 and 2 (sums over chunks); chunk 0 writes loss, ce and divergence; every
#                            chunk writes its part of the gradient.
# Workspace: (N, S, 3, BLOCK_K) elements of ACC_DTYPE per phase.


@triton.jit
def _split_chunk_bounds(n_classes, chunk):
    c_lo = tl.program_id(1) * chunk
    return c_lo, tl.minimum(c_lo + chunk, n_classes)


@triton.jit
def _split_combined_stats(stats_ptr, row, n_splits, t, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Merge the per-chunk (max, sum exp(z - max), sum exp((z - max) / T)) of one row into the row's own."""
    ss = tl.arange(0, BLOCK_S)
    ks = tl.arange(0, BLOCK_K)
    s_mask = (ss < n_splits)[:, None]
    base = stats_ptr + (row * n_splits + ss.to(tl.int64))[:, None] * (3 * BLOCK_K) + ks[None, :]
    part_max = tl.load(base, mask=s_mask, other=float("-inf"))
    part_1 = tl.load(base + BLOCK_K, mask=s_mask, other=0.0)
    part_t = tl.load(base + 2 * BLOCK_K, mask=s_mask, other=0.0)
    run_max = tl.max(part_max, axis=0)
    safe_max = tl.where(run_max == float("-inf"), 0.0, run_max)
    rescale = part_max - safe_max[None, :]  # -inf for chunks (or padded branches) without a finite logit
    sum_1 = tl.sum(tl.where(rescale == float("-inf"), 0.0, part_1 * tl.exp(rescale)), axis=0)
    sum_t = tl.sum(tl.where(rescale == float("-inf"), 0.0, part_t * tl.exp(rescale / t)), axis=0)
    return run_max, sum_1, sum_t


@triton.jit
def _split_sum(part_ptr, row, n_splits, plane, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sum over chunks of one (BLOCK_K,) plane of a row's partials."""
    ss = tl.arange(0, BLOCK_S)
    ks = tl.arange(0, BLOCK_K)
    base = part_ptr + (row * n_splits + ss.to(tl.int64))[:, None] * (3 * BLOCK_K) + plane * BLOCK_K + ks[None, :]
    return tl.sum(tl.load(base, mask=(ss < n_splits)[:, None], other=0.0), axis=0)


@triton.jit
def _split_stats_kernel(
    stats_ptr,  # (N, S, 3, BLOCK_K) out
    logits_ptr,
    stride_ln,
    stride_lk,
    n_classes,
    n_branches,
    chunk,
    n_splits,
    temperature,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < n_branches
    cols = tl.arange(0, BLOCK_C)
    logits_row = logits_ptr + row * stride_ln + ks.to(tl.int64)[:, None] * stride_lk
    t = tl.zeros([], dtype=ACC_DTYPE) + temperature
    c_lo, c_hi = _split_chunk_bounds(n_classes, chunk)
    run_max = tl.full([BLOCK_K], float("-inf"), ACC_DTYPE)
    sum_1 = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    sum_t = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = c0 + cols
        mask = k_mask[:, None] & (cs < c_hi)[None, :]
        z = tl.load(logits_row + cs[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = run_max - safe_max
        shifted = z - safe_max[:, None]
        sum_1 = sum_1 * tl.exp(rescale) + tl.sum(tl.exp(shifted), axis=1)
        sum_t = sum_t * tl.exp(rescale / t) + tl.sum(tl.exp(shifted / t), axis=1)
        run_max = new_max
    out = stats_ptr + (row * n_splits + tl.program_id(1)) * (3 * BLOCK_K) + ks
    tl.store(out, run_max)
    tl.store(out + BLOCK_K, sum_1)
    tl.store(out + 2 * BLOCK_K, sum_t)


@triton.jit
def _split_div_kernel(
    part_ptr,  # (N, S, 3, BLOCK_K) out: divergence statistic, soft CE, sum q (broadcast over branches)
    stats_ptr,
    logits_ptr,
    stride_ln,
    stride_lk,
    targets_ptr,
    stride_tn,
    n_classes,
    n_branches,
    chunk,
    n_splits,
    temperature,
    SOFT_TARGETS: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < n_branches
    cols = tl.arange(0, BLOCK_C)
    logits_row = logits_ptr + row * stride_ln + ks.to(tl.int64)[:, None] * stride_lk
    zero_k = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    t = tl.zeros([], dtype=ACC_DTYPE) + temperature
    k_float = tl.zeros([], dtype=ACC_DTYPE) + n_branches
    log_k = tl.log(k_float)
    run_max, sum_1, sum_t = _split_combined_stats(stats_ptr, row, n_splits, t, BLOCK_S, BLOCK_K)
    row_max = tl.where(k_mask, run_max, 0.0)
    log_sum_1 = tl.log(tl.where(k_mask, sum_1, 1.0))
    log_sum_t = tl.log(tl.where(k_mask, sum_t, 1.0))
    c_lo, c_hi = _split_chunk_bounds(n_classes, chunk)
    div_stat = zero_k
    ce = zero_k
    q_sum = tl.sum(zero_k, axis=0)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = c0 + cols
        c_mask = cs < c_hi
        mask = k_mask[:, None] & c_mask[None, :]
        z = tl.load(logits_row + cs[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        log_p = tl.where(mask, (z - row_max[:, None]) / t - log_sum_t[:, None], float("-inf"))
        p = tl.exp(log_p)
        if DIVERGENCE == 0:
            log_m = _log_mean_exp_over_branches(log_p, c_mask, log_k)
            term = p * tl.where(mask, log_p - log_m[None, :], 0.0)
        else:
            term = (p - tl.sum(p, axis=0)[None, :] / k_float) * tl.where(mask, log_p, 0.0)
        div_stat += tl.sum(term, axis=1)
        if SOFT_TARGETS:
            q = tl.load(targets_ptr + row * stride_tn + cs, mask=c_mask, other=0.0).to(ACC_DTYPE)
            q_sum += tl.sum(q, axis=0)
            ce += tl.sum(tl.where(mask, q[None, :] * ((row_max[:, None] - z) + log_sum_1[:, None]), 0.0), axis=1)
    out = part_ptr + (row * n_splits + tl.program_id(1)) * (3 * BLOCK_K) + ks
    tl.store(out, div_stat)
    tl.store(out + BLOCK_K, ce)
    tl.store(out + 2 * BLOCK_K, zero_k + q_sum)


@triton.jit
def _split_finish_kernel(
    loss_ptr,
    ce_ptr,
    div_ptr,
    grad_ptr,
    stride_gn,
    stride_gk,
    stats_ptr,
    part_ptr,
    logits_ptr,
    stride_ln,
    stride_lk,
    targets_ptr,
    stride_tn,
    n_classes,
    n_branches,
    chunk,
    n_splits,
    weight,
    temperature,
    ignore_index,
    SOFT_TARGETS: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) == 0
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < n_branches
    cols = tl.arange(0, BLOCK_C)
    logits_row = logits_ptr + row * stride_ln + ks.to(tl.int64)[:, None] * stride_lk
    grad_row = grad_ptr + row * stride_gn + ks.to(tl.int64)[:, None] * stride_gk
    zero_k = tl.zeros([BLOCK_K], dtype=ACC_DTYPE)
    c_lo, c_hi = _split_chunk_bounds(n_classes, chunk)

    if not SOFT_TARGETS:
        y = tl.load(targets_ptr + row * stride_tn).to(tl.int64)
        if y == ignore_index:
            if first:
                tl.store(loss_ptr + row, tl.sum(zero_k, axis=0))
                tl.store(div_ptr + row, tl.sum(zero_k, axis=0))
                tl.store(ce_ptr + row * n_branches + ks, zero_k, mask=k_mask)
            if COMPUTE_GRAD:
                for c0 in range(c_lo, c_hi, BLOCK_C):
                    cs = c0 + cols
                    mask = k_mask[:, None] & (cs < c_hi)[None, :]
                    tl.store(grad_row + cs[None, :], tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC_DTYPE), mask=mask)
            return
        bad_target = (y < 0) | (y >= n_classes)
        y = tl.where(bad_target, 0, y)
        nan_if_bad = tl.where(bad_target, float("nan"), 0.0).to(ACC_DTYPE)
    else:
        nan_if_bad = tl.sum(zero_k, axis=0)
        y = row  # unused with soft targets

    t = tl.zeros([], dtype=ACC_DTYPE) + temperature
    lam = tl.zeros([], dtype=ACC_DTYPE) + weight
    k_float = tl.zeros([], dtype=ACC_DTYPE) + n_branches
    if DIVERGENCE == 0:
        div_scale = 1.0 / k_float
    else:
        div_scale = tl.where(k_float > 1.0, k_float / tl.maximum(k_float - 1.0, 1.0), 0.0)
    log_k = tl.log(k_float)
    run_max, sum_1, sum_t = _split_combined_stats(stats_ptr, row, n_splits, t, BLOCK_S, BLOCK_K)
    row_max = tl.where(k_mask, run_max, 0.0)
    log_sum_1 = tl.log(tl.where(k_mask, sum_1, 1.0))
    log_sum_t = tl.log(tl.where(k_mask, sum_t, 1.0))
    div_stat = _split_sum(part_ptr, row, n_splits, 0, BLOCK_S, BLOCK_K)

    if first:
        if SOFT_TARGETS:
            ce = _split_sum(part_ptr, row, n_splits, 1, BLOCK_S, BLOCK_K)
        else:
            z_y = tl.load(logits_ptr + row * stride_ln + ks.to(tl.int64) * stride_lk + y, mask=k_mask, other=0.0)
            ce = tl.where(k_mask, (row_max - z_y.to(ACC_DTYPE)) + log_sum_1, 0.0)
        ce += nan_if_bad
        div = t * t * div_scale * tl.sum(div_stat, axis=0) + nan_if_bad
        tl.store(ce_ptr + row * n_branches + ks, ce, mask=k_mask)
        tl.store(div_ptr + row, div)
        tl.store(loss_ptr + row, tl.sum(tl.where(k_mask, ce, 0.0), axis=0) + lam * div)

    if COMPUTE_GRAD:
        if SOFT_TARGETS:
            q_sum = tl.max(_split_sum(part_ptr, row, n_splits, 2, BLOCK_S, BLOCK_K), axis=0)
        else:
            q_sum = nan_if_bad  # unused with class-index targets
        _store_logit_grads(
            grad_row, logits_row, targets_ptr, row, stride_tn, y, q_sum, c_lo, c_hi, cols, k_mask, row_max,
            log_sum_1, log_sum_t, t, div_stat, lam * t * div_scale, log_k, k_float, nan_if_bad,
            SOFT_TARGETS, DIVERGENCE, BLOCK_C, ACC_DTYPE,
        )


MAX_CLASS_SPLIT_TILE = 2048
"""Largest [BLOCK_S, BLOCK_K] tile of partials a program of the split path combines (bounds S for large K)."""
PROGRAMS_PER_SM = 2
"""The automatic class split aims at this many programs per SM (two waves' worth hides the tail)."""


def class_splits_for(samples: int, branches: int, classes: int, block_c: int, multiprocessors: int | None,
                     requested: int = 0) -> int:
    """How many class chunks per sample: ``requested`` (> 0, for tests and benchmarks) capped by the number of
    BLOCK_C blocks and the partial-tile bound; else, with a known SM count and fewer samples than
    ``PROGRAMS_PER_SM`` * SMs, enough chunks to reach that many programs; else 1 (one program per sample)."""
    blocks = triton.cdiv(max(classes, 1), block_c)
    limit = max(1, min(blocks, MAX_CLASS_SPLIT_TILE // triton.next_power_of_2(branches)))
    if requested > 0:
        return min(requested, limit)
    if not multiprocessors or samples >= PROGRAMS_PER_SM * multiprocessors:
        return 1
    return min(limit, triton.cdiv(PROGRAMS_PER_SM * multiprocessors, max(samples, 1)))


def _launch_split(loss, ce, div, grad, stride_gn, stride_gk, logits, stride_ln, stride_lk, targets, c, branches,
                  weight, temperature, ignore_index, constexprs, cfg, splits) -> None:
    """The class-split path (see above): three launches over an (N, S) grid."""
    n = loss.shape[0]
    block_c = cfg["BLOCK_C"]
    chunk = triton.cdiv(triton.cdiv(c, splits), block_c) * block_c  # whole blocks per chunk
    splits = triton.cdiv(c, chunk)  # no empty chunk
    block_s = triton.next_power_of_2(splits)
    stats = torch.empty(n, splits, 3, cfg["BLOCK_K"], dtype=loss.dtype, device=loss.device)
    part = torch.empty_like(stats)
    acc = constexprs["ACC_DTYPE"]
    tiles = {"BLOCK_K": cfg["BLOCK_K"], "BLOCK_C": block_c}
    grid = (n, splits)

    def config(**extra):
        return triton.Config({**tiles, **extra}, num_warps=cfg["num_warps"])

    launch(_split_stats_kernel, grid,
           (stats, logits, stride_ln, stride_lk, c, branches, chunk, splits, float(temperature)),
           {"ACC_DTYPE": acc}, config())
    launch(_split_div_kernel, grid,
           (part, stats, logits, stride_ln, stride_lk, targets, targets.stride(0), c, branches, chunk, splits,
            float(temperature)),
           {"SOFT_TARGETS": constexprs["SOFT_TARGETS"], "DIVERGENCE": constexprs["DIVERGENCE"], "ACC_DTYPE": acc},
           config(BLOCK_S=block_s))
    launch(_split_finish_kernel, grid,
           (loss, ce, div, grad, stride_gn, stride_gk, stats, part, logits, stride_ln, stride_lk, targets,
            targets.stride(0), c, branches, chunk, splits, float(weight), float(temperature), ignore_index),
           constexprs, config(BLOCK_S=block_s))


def launch_config(branches: int, classes: int, dtype: torch.dtype, block_c: int = 0) -> dict[str, int]:
    """BLOCK_K, BLOCK_C and num_warps for K branches and C classes (``block_c`` > 0 forces BLOCK_C, for tests)."""
    block_k = triton.next_power_of_2(branches)
    if block_c <= 0:
        max_tile = _MAX_TILE.get(dtype, _DEFAULT_MAX_TILE)
        block_c = min(triton.next_power_of_2(max(classes, 1)), max(_MIN_BLOCK_C, max_tile // block_k))
    elif block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of two, got {block_c}")
    tile = block_k * block_c
    num_warps = 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 1024 else 8
    return {"BLOCK_K": block_k, "BLOCK_C": block_c, "num_warps": num_warps}


def _row_strides(x: Tensor, branches: int) -> tuple[int, int]:
    """(sample stride, branch stride) of logits in the layout (N, K*C) or (K, N, C); class stride must be 1."""
    if x.dim() == 3:
        return x.stride(1), x.stride(0)
    return x.stride(0), (x.shape[1] // branches) * x.stride(1)


def _layout_sizes(logits: Tensor, branches: int) -> tuple[int, int]:
    if logits.dim() == 3:
        return logits.shape[1], logits.shape[2]
    return logits.shape[0], logits.shape[1] // branches


@torch.library.custom_op("groupnet::cotrain_loss_forward", mutates_args=())
def cotrain_loss_forward(
    logits: Tensor,
    targets: Tensor,
    branches: int,
    weight: float,
    temperature: float,
    ignore_index: int,
    divergence: str,
    compute_grad: bool,
    block_c: int,
    class_splits: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel. Returns per-sample (loss (N,), ce (N, K), divergence (N,)) and the gradient of each
    sample's loss w.r.t. the logits (logits' shape, fp32 or fp64; an empty tensor when ``compute_grad`` is False).

    ``logits``: ``(N, K*C)`` or ``(K, N, C)``; ``targets``: ``(N,)`` int64 or ``(N, C)`` floating. Inputs are
    assumed validated (``groupnet.ops.cotrain_loss``); only the logits' dtype and device are checked here.
    ``class_splits``: 0 picks the class split by :func:`class_splits_for` (CUDA: from the SM count), > 0 forces
    up to that many class chunks per sample (1: one program per sample).
    """
    check_launch_tensors("cotrain_loss", logits.dtype, logits=logits)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, c = _layout_sizes(logits, branches)
    acc = accumulator_dtype(logits.dtype)
    if targets.dim() == 2:
        targets = targets.to(acc)
        if targets.stride(-1) != 1:
            targets = targets.contiguous()
    dev = logits.device
    loss = torch.empty(n, dtype=acc, device=dev)
    ce = torch.empty(n, branches, dtype=acc, device=dev)
    div = torch.empty(n, dtype=acc, device=dev)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=acc, device=dev)
    if n == 0:
        return loss, ce, div, grad
    stride_ln, stride_lk = _row_strides(logits, branches)
    stride_gn, stride_gk = _row_strides(grad, branches) if compute_grad else (0, 0)
    cfg = launch_config(branches, c, logits.dtype, block_c)
    args = (
        loss, ce, div, grad, stride_gn, stride_gk, logits, stride_ln, stride_lk, targets, targets.stride(0),
        c, branches, float(weight), float(temperature), ignore_index,
    )  # fmt: skip
    constexprs = {
        "SOFT_TARGETS": targets.dim() == 2,
        "DIVERGENCE": DIVERGENCES.index(divergence),
        "COMPUTE_GRAD": compute_grad,
        "ACC_DTYPE": tl_accumulator_dtype(logits.dtype),
    }
    sms = multiprocessor_count(dev)
    splits = class_splits_for(n, branches, c, cfg["BLOCK_C"], sms, class_splits)
    if splits > 1:
        _launch_split(loss, ce, div, grad, stride_gn, stride_gk, logits, stride_ln, stride_lk, targets, c, branches,
                      weight, temperature, ignore_index, constexprs, cfg, splits)
        return loss, ce, div, grad
    config = triton.Config({"BLOCK_K": cfg["BLOCK_K"], "BLOCK_C": cfg["BLOCK_C"]}, num_warps=cfg["num_warps"])
    launch(_cotrain_loss_kernel, (n,), args, constexprs, config)
    return loss, ce, div, grad


@cotrain_loss_forward.register_fake
def _(logits, targets, branches, weight, temperature, ignore_index, divergence, compute_grad, block_c,
      class_splits=0):
    n, _c = _layout_sizes(logits, branches)
    acc = accumulator_dtype(logits.dtype)
    new = logits.new_empty
    grad = new(logits.shape if compute_grad else (0,), dtype=acc)
    return new((n,), dtype=acc), new((n, branches), dtype=acc), new((n,), dtype=acc), grad


class CoTrainLossFunction(torch.autograd.Function):
    """Autograd glue: forward runs the custom op; backward scales the saved gradient by the incoming per-sample
    gradient on the device. The per-branch CE and divergence outputs are not differentiable (logging only)."""

    @staticmethod
    def forward(logits, targets, branches, weight, temperature, ignore_index, divergence, compute_grad, block_c,
                class_splits):
        return torch.ops.groupnet.cotrain_loss_forward(
            logits, targets, branches, weight, temperature, ignore_index, divergence, compute_grad, block_c,
            class_splits,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, branches = inputs[0], inputs[2]
        _loss, ce, div, grad = output
        ctx.mark_non_differentiable(ce, div, grad)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        ctx.branch_major = logits.dim() == 3

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div, _grad_grad):
        (grad,) = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            if grad.numel() == 0 and grad_loss.numel() > 0:
                raise RuntimeError("cotrain_loss: backward called but the forward did not compute the gradient")
            scale = grad_loss.view(1, -1, 1) if ctx.branch_major else grad_loss.view(-1, 1)
            grad_logits = (grad * scale.to(grad.dtype)).to(ctx.logits_dtype)
        return grad_logits, None, None, None, None, None, None, None, None, None


def cotrain_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    branches: int,
    weight: float,
    temperature: float = 1.0,
    ignore_index: int = -100,
    divergence: str = "js",
    block_c: int = 0,
    class_splits: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample co-training loss by the fused kernel: ``(loss (N,), ce (N, K), divergence (N,))``.

    ``loss`` is differentiable w.r.t. ``logits``; ``ce`` and ``divergence`` (the ``T^2 * D`` term that ``weight``
    multiplies) are for logging. Ignored samples give 0 in all three. ``block_c``/``class_splits`` > 0 force the
    class block / the number of class chunks per sample (tests, benchmarks); 0 chooses. Reduction over samples is
    the caller's (:class:`groupnet.cotraining.CoTrainingLoss` takes the mean over non-ignored samples).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"the fused kernel supports divergence in {DIVERGENCES}, got {divergence!r}")
    if branches > MAX_BRANCHES:
        raise ValueError(f"the fused kernel supports up to {MAX_BRANCHES} branches, got {branches}")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, ce, div, _grad = CoTrainLossFunction.apply(
        logits, targets, branches, weight, temperature, ignore_index, divergence, compute_grad, block_c, class_splits
    )
    return loss, ce, div


def launch_cases() -> list[LaunchCase]:
    """The loss of every classifier of ``kernels/_launch_shapes.py`` (N = BATCH, C = CLASSES): logits ``(N, K*C)`` as
    the grouped linear writes them, fp32 / bf16 / fp16, hard targets (default divergence) and soft targets (mixup),
    with the gradient, and hard targets without it (evaluation); plus wide heads (the roofline's ImageNet and
    32k-class shapes, BLOCK_C < C) and K = MAX_BRANCHES, run through the custom op's own body on meta tensors."""
    from . import _launch_shapes

    rows = [(_launch_shapes.BATCH, k, _launch_shapes.CLASSES) for k in sorted({s.branches for s in
                                                                              _launch_shapes.LINEAR_SHAPES})]
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, k, c in rows + [(256, 4, 1000), (64, 2, 32000), (64, MAX_BRANCHES, 1000)]:
            for soft, divergence, grad in ((False, "js", True), (True, "kl", True), (False, "js", False)):
                logits = torch.empty(n, k * c, dtype=dtype, device="meta")
                targets = (torch.empty(n, c, dtype=dtype, device="meta") if soft
                           else torch.empty(n, dtype=torch.long, device="meta"))
                label = (f"{TORCH_TO_TRITON_DTYPE[dtype]} N{n} K{k} C{c} {'soft' if soft else 'hard'} "
                         f"{divergence}{'' if grad else ' eval'}")
                cases.append(LaunchCase(
                    label, "forward",
                    lambda lg=logits, t=targets, k=k, d=divergence, g=grad: cotrain_loss_forward._init_fn(
                        lg, t, k, 1.0, 1.0, -100, d, g, 0),
                    variant=TORCH_TO_TRITON_DTYPE[dtype],
                    has_dot=False,
                ))
    return cases


@functools.cache
def compile_specs() -> list[CompileSpec]:
    """The distinct JIT specializations of :func:`launch_cases` (kernels/report.py)."""
    return specs_from_launches("cotrain_loss", launch_cases())


# Rough count of floating-point ops per logit over the three passes (3 exp, 2 log-sum-exp over branches,
# divergence and gradient terms); an estimate for the roofline report, not a measurement.
_FLOPS_PER_LOGIT = 40.0


class LossWorkload(NamedTuple):
    """One co-training loss launch: N samples, K branches, C classes, logits dtype ("fp32" or "bf16")."""

    samples: int
    branches: int
    classes: int
    dtype: str


def roofline_cases(workloads: Sequence[LossWorkload]) -> list[dict]:
    """Minimum traffic of each launch: the logits read once, the fp32 gradient written once (plus per-sample
    outputs)."""
    cases = []
    for n, k, c, dtype in workloads:
        logits_bytes = n * k * c * (2 if dtype == "bf16" else 4)
        cases.append(
            {
                "name": f"fwd+grad K={k} N={n} C={c} {dtype} logits",
                "flops": _FLOPS_PER_LOGIT * n * k * c,
                "bytes": float(logits_bytes + 4 * n * k * c + 4 * n * (k + 3)),
                "dtype": "fp32",
                "notes": "three passes over each row (the re-reads hit L2 for these row sizes); fp32 arithmetic",
            }
        )
    return cases
