"""The co-training loss op: per-sample ``sum_k CE_k + weight * T^2 * D`` of K branches' logits (SplitNet).

Validated here, once (shapes, dtypes, devices, and on request finite values and target ranges, in one host sync);
then the torch path or the fused Triton kernel (``groupnet.kernels.cotrain_loss``), as :mod:`groupnet.ops.backend`
chooses. The kernel takes at most its ``MAX_BRANCHES`` branches; more always run the torch path. The formulas are
in :mod:`groupnet.cotraining`, the module users call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from groupnet import _checks
from groupnet.ops.backend import backend_for


class CoTrainLossRows(NamedTuple):
    """Per-sample results of :func:`cotrain_loss`; ignored samples give 0 in all three."""

    loss: Tensor
    """``(N,)``, differentiable w.r.t. the logits: ``sum_k CE_k + weight * T^2 * D``."""
    ce: Tensor
    """``(N, K)``: each branch's cross-entropy (for logging)."""
    divergence: Tensor
    """``(N,)``: ``T^2 * D``, the term that ``weight`` multiplies (for logging)."""


def cotrain_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    branches: int,
    weight: float,
    divergence: str = "js",
    temperature: float = 1.0,
    ignore_index: int = -100,
    check_finite: bool = True,
    check_targets: bool = True,
    label_smoothing: float = 0.0,
) -> CoTrainLossRows:
    """Per-sample co-training loss of ``logits`` (``(N, K*C)`` or ``(K, N, C)``) against ``targets`` (``(N,)``
    class indices or ``(N, C)`` soft targets). Reduction over samples is the caller's.

    ``label_smoothing`` = eps in [0, 1) replaces the target distribution q by ``(1 - eps) q + eps / C`` in the
    cross-entropy, as ``F.cross_entropy(label_smoothing=eps)`` does (hard and soft targets alike); samples whose
    hard target is ``ignore_index`` still give 0."""
    _checks.check_divergence(divergence)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    n, c = _check_inputs(logits, targets, branches)
    _check_values(logits, targets, c, ignore_index, check_finite=check_finite, check_targets=check_targets)
    targets = targets.detach() if targets.dim() == 2 else targets.long()
    if label_smoothing > 0:
        return _smoothed(logits, targets, n, c, branches, weight, divergence, temperature, ignore_index,
                         float(label_smoothing))
    if backend_for(logits) == "triton":
        from groupnet.kernels import cotrain_loss as kernel

        if branches <= kernel.MAX_BRANCHES:
            return CoTrainLossRows(*kernel.cotrain_loss(
                logits, targets, branches=branches, weight=weight, temperature=temperature,
                ignore_index=ignore_index, divergence=divergence,
            ))  # fmt: skip
    return _rows_torch(logits, targets, n, c, branches, weight, divergence, temperature, ignore_index)


def _smoothed(
    logits: Tensor, targets: Tensor, n: int, c: int, k: int, weight: float, divergence: str, t: float,
    ignore_index: int, eps: float,
) -> CoTrainLossRows:  # fmt: skip
    """The loss with smoothed soft targets; ignored hard-target samples are masked to 0 afterwards."""
    valid = None
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    if targets.dim() == 1:
        valid = targets != ignore_index
        targets = F.one_hot(torch.where(valid, targets, 0), c).to(dtype)
    soft = targets.to(dtype) * (1.0 - eps) + eps / c
    rows = cotrain_loss(logits, soft, branches=k, weight=weight, divergence=divergence, temperature=t,
                        ignore_index=ignore_index, check_finite=False, check_targets=False)
    if valid is None:
        return rows
    return CoTrainLossRows(torch.where(valid, rows.loss, 0.0), torch.where(valid.unsqueeze(1), rows.ce, 0.0),
                           torch.where(valid, rows.divergence, 0.0))


def _rows_torch(
    logits: Tensor, targets: Tensor, n: int, c: int, k: int, weight: float, divergence: str, t: float,
    ignore_index: int,
) -> CoTrainLossRows:  # fmt: skip
    """Per-sample (loss, ce (N, K), T^2 * D) by torch ops; ignored samples give 0."""
    z = logits.unflatten(1, (k, c)) if logits.dim() == 2 else logits.transpose(0, 1)  # (N, K, C)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    log_p1 = F.log_softmax(z, dim=-1)
    if targets.dim() == 2:
        valid = None
        ce = -(targets.to(z.dtype).unsqueeze(1) * log_p1).sum(-1)
    else:
        valid = targets != ignore_index
        index = torch.where(valid, targets, 0).view(n, 1, 1).expand(n, k, 1)
        ce = -log_p1.gather(-1, index).squeeze(-1)
    log_p = log_p1 if t == 1.0 else F.log_softmax(z / t, dim=-1)
    if k == 1:
        div = z.new_zeros(n)
    elif divergence == "js":
        log_m = torch.logsumexp(log_p, dim=1, keepdim=True) - math.log(k)
        div = (log_p.exp() * (log_p - log_m)).sum(-1).mean(1)
    else:
        # 1/(K-1) sum_{i != j} KL(p_j || p_i) = K/(K-1) sum_{i,c} (p_i log p_i - m_c log p_i) with m = mean_j p_j
        # (the i == j terms are 0); with the teacher p_j detached only the second log p_i carries gradient.
        teacher = log_p.detach()
        p_teacher = teacher.exp()
        m = p_teacher.mean(1, keepdim=True)
        div = (p_teacher * teacher - m * log_p).sum((1, 2)) * (k / (k - 1))
    div = div * (t * t)
    loss = ce.sum(1) + weight * div
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
        ce = torch.where(valid.unsqueeze(1), ce, 0.0)
        div = torch.where(valid, div, 0.0)
    return CoTrainLossRows(loss, ce, div)


def _check_inputs(logits: Tensor, targets: Tensor, k: int) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; return (N, C)."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"CoTrainingLoss expects tensors, got {type(logits).__name__}, {type(targets).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"CoTrainingLoss expects floating-point logits, got {logits.dtype}")
    if logits.dim() == 2:
        n, width = logits.shape
        if width == 0 or width % k:
            raise ValueError(
                f"CoTrainingLoss expects logits (N, K*C) with K={k}: width {width} is not a positive multiple of {k}"
            )
        c = width // k
    elif logits.dim() == 3:
        if logits.shape[0] != k:
            raise ValueError(f"CoTrainingLoss expects logits (K, N, C) with K={k}, got shape {tuple(logits.shape)}")
        _, n, c = logits.shape
        if c == 0:
            raise ValueError(f"CoTrainingLoss expects at least one class, got shape {tuple(logits.shape)}")
    else:
        raise ValueError(f"CoTrainingLoss expects logits (N, K*C) or (K, N, C), got shape {tuple(logits.shape)}")
    if targets.device != logits.device:
        raise RuntimeError(f"CoTrainingLoss: logits are on {logits.device} but targets on {targets.device}")
    if targets.dim() == 1:
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"CoTrainingLoss: hard targets (N,) must be an integer dtype, got {targets.dtype}")
        if targets.shape[0] != n:
            raise ValueError(f"CoTrainingLoss: targets have shape {tuple(targets.shape)}, expected ({n},)")
    elif targets.dim() == 2:
        if not targets.is_floating_point():
            raise TypeError(f"CoTrainingLoss: soft targets (N, C) must be floating point, got {targets.dtype}")
        if tuple(targets.shape) != (n, c):
            raise ValueError(
                f"CoTrainingLoss: soft targets have shape {tuple(targets.shape)}, expected (N, C) = ({n}, {c})"
            )
    else:
        raise ValueError(
            f"CoTrainingLoss expects targets (N,) class indices or (N, C) soft targets, got shape {tuple(targets.shape)}"
        )
    return n, c


def _check_values(
    logits: Tensor, targets: Tensor, c: int, ignore_index: int, *, check_finite: bool, check_targets: bool
) -> None:
    """NaN/inf and target-range checks, reduced to one device-to-host transfer."""
    flags = []
    if check_finite:
        finite = torch.isfinite(logits).all()
        if targets.dim() == 2:
            finite = finite & torch.isfinite(targets).all()
        flags.append(~finite)
    out_of_range = None
    if check_targets and targets.dim() == 1:
        out_of_range = ((targets < 0) | (targets >= c)) & (targets != ignore_index)
        flags.append(out_of_range.any())
    not_probabilities = None
    if check_targets and targets.dim() == 2:  # soft targets: a distribution per row (NaN is check_finite's)
        t = targets if targets.dtype == torch.float64 else targets.float()
        tol = 1e-2 if targets.dtype in (torch.float16, torch.bfloat16) else 1e-3
        not_probabilities = (t < 0).any() | ((t.sum(1) - 1).abs() > tol).any()
        flags.append(not_probabilities)
    if not flags or not torch.stack(flags).any().item():
        return
    if check_finite and bool(flags[0]):
        raise ValueError(
            "CoTrainingLoss: logits or soft targets contain NaN or inf (check_finite=True); "
            f"{int((~torch.isfinite(logits)).sum())} non-finite logits"
        )
    if not_probabilities is not None:
        sums = targets.double().sum(1)
        raise ValueError(
            "CoTrainingLoss: soft targets must be probabilities, each row >= 0 and summing to 1 (check_targets=True); "
            f"got entries down to {float(targets.min()):.4g} and row sums in [{float(sums.min()):.4g}, "
            f"{float(sums.max()):.4g}]"
        )
    bad = targets[out_of_range].unique()[:8].tolist()
    raise ValueError(f"CoTrainingLoss: targets must be in [0, {c}) or ignore_index={ignore_index}, got values {bad}")
