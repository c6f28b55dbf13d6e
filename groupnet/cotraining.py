"""The co-training objective of SplitNet ("Divide and Co-training") and the ramp of its weight.

For K branches with logits ``z_k`` and targets ``y`` (class indices) or ``q`` (soft targets, e.g. from mixup,
cutmix or label smoothing), per sample::

    loss = sum_k CE(z_k, y) + weight * T^2 * D(softmax(z_1 / T), ..., softmax(z_K / T))

- CE is summed over branches (not averaged), as in SplitNet, and is always taken at temperature 1.
- ``divergence="js"`` (SplitNet's default): the generalised Jensen-Shannon divergence
  ``D = H(mean_k p_k) - mean_k H(p_k) = (1/K) sum_k KL(p_k || m)``, with gradients into every branch.
- ``divergence="kl"`` (SplitNet's ``kl_seperate``): ``D = 1/(K-1) sum_{i != j} KL(p_j.detach() || p_i)``, each
  branch distilled from every other with the teacher side detached.
- Temperature ``T`` (default 1 = SplitNet) softens the distributions of the divergence only, and the divergence is
  multiplied by ``T^2`` (as in distillation) so its gradient magnitude stays comparable across temperatures.
- With K = 1 the divergence is 0 and the loss is plain cross-entropy.

The loss is the mean over samples; with hard targets, samples whose target is ``ignore_index`` contribute neither
CE nor divergence and the mean is over the others (an all-ignored batch gives 0 with zero gradients). A mixup batch
``lam * CE(y_a) + (1 - lam) * CE(y_b)`` is the same as CE with the soft target ``lam * onehot(y_a) + (1 - lam) *
onehot(y_b)``; soft targets are constants (no gradient flows into them).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from groupnet._checks import check_divergence
from groupnet.ops import cotrain_loss


class CoTrainingOutput(NamedTuple):
    """What :class:`CoTrainingLoss` returns: everything a trainer logs, without recomputation.

    ``loss == ce.sum() + weight * divergence`` (up to rounding).
    """

    loss: Tensor
    """Scalar, differentiable: mean over (non-ignored) samples of ``sum_k CE_k + weight * T^2 * D``."""
    ce: Tensor
    """``(K,)``, detached: each branch's mean cross-entropy."""
    divergence: Tensor
    """Scalar, detached: the mean of ``T^2 * D``, the term that ``weight`` multiplies."""
    weight: float
    """The divergence weight in force for this call."""


def _check_float(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class CoTrainingLoss(nn.Module):
    """Sum of the K branches' cross-entropies plus ``weight`` times their divergence (see the module docstring).

    Args:
        branches: K.
        weight: lambda, the divergence weight; a trainer usually ramps it with :class:`CoTrainingWeightRamp`.
        divergence: ``"js"`` (Jensen-Shannon among the K distributions) or ``"kl"`` (pairwise KL, teacher side
            detached). Both are computed by the fused Triton kernel on the Triton backend.
        temperature: T > 0 of the divergence (CE is always at T = 1); the divergence is scaled by ``T^2``.
        ignore_index: hard-target value of samples to skip.
        check_finite: raise on NaN/inf logits (or soft targets). It costs one host sync per call on a GPU (shared
            with ``check_targets``); switch it off for speed, then non-finite inputs give a NaN loss.
        check_targets: raise on hard targets outside ``[0, C)`` that are not ``ignore_index``. With it off, the
            Triton kernel gives NaN for such samples and the torch path fails in torch's gather (index error).
        label_smoothing: eps in [0, 1): each branch's cross-entropy is taken against ``(1 - eps) q + eps / C``
            (q: the one-hot or soft target), as ``nn.CrossEntropyLoss(label_smoothing=eps)``; the divergence is
            unaffected.

    Returns:
        A :class:`CoTrainingOutput` named tuple, not a tensor: ``.loss`` is the scalar to backpropagate (the mean
        over non-ignored samples); ``.ce`` (``(K,)``), ``.divergence`` and ``.weight`` are detached, for logging.
        Code written for ``nn.CrossEntropyLoss`` takes ``loss_fn(logits, y).loss``.

    Shape:
        - logits: ``(N, K*C)`` (groupnet's layout: branch k owns columns ``[k*C, (k+1)*C)``) or ``(K, N, C)``;
          fp16/bf16 logits are computed in fp32, fp64 in fp64.
        - targets: ``(N,)`` class indices (integer dtype) or ``(N, C)`` soft targets (floating dtype).

    Backend: the op :func:`groupnet.ops.cotrain_loss` validates the inputs and picks the fused Triton kernel
    (:mod:`groupnet.kernels.cotrain_loss`) or the torch path (:mod:`groupnet.ops.backend`: CUDA tensors use the
    kernel, CPU tensors torch, unless :func:`groupnet.ops.use_backend` says otherwise).
    """

    def __init__(
        self,
        branches: int,
        *,
        weight: float = 0.5,
        divergence: str = "js",
        temperature: float = 1.0,
        ignore_index: int = -100,
        check_finite: bool = True,
        check_targets: bool = True,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise ValueError(f"branches must be a positive int, got {branches!r}")
        check_divergence(divergence)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.branches = branches
        self.weight = weight
        self.divergence = divergence
        self.temperature = _check_float("temperature", temperature, positive=True)
        self.ignore_index = ignore_index
        self.check_finite = check_finite
        self.check_targets = check_targets
        self.label_smoothing = _check_float("label_smoothing", label_smoothing)
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")

    @property
    def weight(self) -> float:
        """lambda, the divergence weight (set by :class:`CoTrainingWeightRamp`)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = _check_float("weight", value)

    def extra_repr(self) -> str:
        return (
            f"branches={self.branches}, weight={self.weight}, divergence={self.divergence!r}, "
            f"temperature={self.temperature}, ignore_index={self.ignore_index}"
            + (f", label_smoothing={self.label_smoothing}" if self.label_smoothing else "")
        )

    def forward(self, logits: Tensor, targets: Tensor) -> CoTrainingOutput:
        """Co-training loss of ``logits`` (``(N, K*C)`` or ``(K, N, C)``) against ``targets``."""
        rows = cotrain_loss(
            logits,
            targets,
            branches=self.branches,
            weight=self.weight,
            divergence=self.divergence,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            check_finite=self.check_finite,
            check_targets=self.check_targets,
            label_smoothing=self.label_smoothing,
        )
        if targets.dim() == 2:
            count = rows.loss.new_full((), float(max(targets.shape[0], 1)))
        else:
            count = (targets != self.ignore_index).sum().clamp(min=1).to(rows.loss.dtype)
        return CoTrainingOutput(
            loss=rows.loss.sum() / count,
            ce=rows.ce.detach().sum(0) / count,
            divergence=rows.divergence.detach().sum() / count,
            weight=self.weight,
        )


class CoTrainingWeightRamp:
    """SplitNet's linear warm-up of the divergence weight, stepped by the trainer once per epoch (or per step with
    fractional epochs).

    ``weight(epoch) = max(final * epoch / warmup_epochs, start)`` while ``epoch < warmup_epochs``, then ``final``
    (SplitNet: final 0.5, start 0.005, 40 warm-up epochs). ``epoch`` counts completed epochs: the weight in force
    while training epoch e (0-based) is ``weight(e)``. Each change is written to ``loss.weight`` when a loss is
    attached.

    Example::

        ramp = CoTrainingWeightRamp(loss)           # loss.weight = 0.005 for epoch 0
        for epoch in range(start_epoch, epochs):
            train_one_epoch(...)
            ramp.step()                             # or ramp.step(epoch + (i + 1) / steps) after every step
        state = {"ramp": ramp.state_dict(), ...}    # resume with ramp.load_state_dict(state["ramp"])
    """

    def __init__(
        self,
        loss: CoTrainingLoss | None = None,
        *,
        final: float = 0.5,
        start: float = 0.005,
        warmup_epochs: float = 40,
        epoch: float = 0.0,
    ) -> None:
        self.loss = loss
        self._configure(final=final, start=start, warmup_epochs=warmup_epochs, epoch=epoch)

    def _configure(self, *, final: float, start: float, warmup_epochs: float, epoch: float) -> None:
        final, start = _check_float("final", final), _check_float("start", start)
        if start > final:
            raise ValueError(f"start ({start}) must not exceed final ({final})")
        self.final, self.start = final, start
        self.warmup_epochs = _check_float("warmup_epochs", warmup_epochs)
        self.epoch = _check_float("epoch", epoch)
        self._apply()

    def value(self, epoch: float) -> float:
        """The weight at ``epoch`` (completed epochs, may be fractional)."""
        if epoch >= self.warmup_epochs:
            return self.final
        return max(self.final * epoch / self.warmup_epochs, self.start)

    @property
    def weight(self) -> float:
        """The weight in force now."""
        return self.value(self.epoch)

    def step(self, epoch: float | None = None) -> float:
        """Advance one epoch (or jump to ``epoch``), update ``loss.weight`` and return the new weight."""
        self.epoch = self.epoch + 1.0 if epoch is None else _check_float("epoch", epoch)
        return self._apply()

    def _apply(self) -> float:
        w = self.weight
        if self.loss is not None:
            self.loss.weight = w
        return w

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume exactly (the schedule and the position in it)."""
        return {"epoch": self.epoch, "final": self.final, "start": self.start, "warmup_epochs": self.warmup_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`'s output and re-apply the weight to the attached loss."""
        expected = {"epoch", "final", "start", "warmup_epochs"}
        if set(state) != expected:
            raise KeyError(f"CoTrainingWeightRamp state must have keys {sorted(expected)}, got {sorted(state)}")
        self._configure(
            final=state["final"],
            start=state["start"],
            warmup_epochs=state["warmup_epochs"],
            epoch=state["epoch"],
        )

    def __repr__(self) -> str:
        return (
            f"CoTrainingWeightRamp(final={self.final}, start={self.start}, warmup_epochs={self.warmup_epochs}, "
            f"epoch={self.epoch})"
        )
