"""Expected calibration error (ECE) from per-bin sums, so that batches and processes add up before the division.

ECE = sum over equal-width confidence bins b of (|b| / N) * |accuracy(b) - mean confidence(b)|, with the confidence
the top softmax probability (Guo et al., 2017; 15 bins as there).
"""

from __future__ import annotations

import torch
from torch import Tensor

ECE_BINS = 15


def calibration_sums(scores: Tensor, targets: Tensor, bins: int = ECE_BINS) -> Tensor:
    """``(3, bins)`` float64 sums per confidence bin: sample count, confidence, correct predictions.

    ``scores`` are ``(N, C)`` logits or log-probabilities (their softmax is the predictive distribution).
    """
    probs = torch.softmax(scores.double(), dim=-1)
    confidence, predicted = probs.max(dim=-1)
    index = (confidence * bins).long().clamp_(max=bins - 1)  # confidence 1.0 falls in the last bin
    sums = torch.zeros(3, bins, dtype=torch.float64, device=scores.device)
    sums[0].index_add_(0, index, torch.ones_like(confidence))
    sums[1].index_add_(0, index, confidence)
    sums[2].index_add_(0, index, (predicted == targets).double())
    return sums


def expected_calibration_error(sums: Tensor) -> float:
    """ECE (a fraction in [0, 1]) from summed :func:`calibration_sums`."""
    count, confidence, correct = sums.double()
    n = float(count.sum())
    if n == 0:
        return float("nan")
    return float((confidence - correct).abs().sum() / n)
