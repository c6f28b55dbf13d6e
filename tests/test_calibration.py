"""Expected calibration error from batch sums equals a direct per-sample computation."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.training.calibration import ECE_BINS, calibration_sums, expected_calibration_error


def naive_ece(scores: torch.Tensor, targets: torch.Tensor, bins: int) -> float:
    probs = torch.softmax(scores.double(), -1)
    total = 0.0
    edges = [i / bins for i in range(bins + 1)]
    conf, pred = probs.max(-1)
    for b in range(bins):
        upper_ok = conf <= edges[b + 1] if b == bins - 1 else conf < edges[b + 1]
        members = (conf >= edges[b]) & upper_ok
        if members.any():
            acc = (pred[members] == targets[members]).double().mean()
            total += float(members.sum()) / len(targets) * abs(float(acc) - float(conf[members].mean()))
    return total


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), c=st.integers(2, 7), scale=st.floats(0.1, 8.0), chunks=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_ece_from_batch_sums_equals_the_per_sample_definition(n, c, scale, chunks, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, c, (n,), generator=gen)
    sums = sum(calibration_sums(s, t) for s, t in zip(scores.tensor_split(chunks), targets.tensor_split(chunks)))
    assert math.isclose(expected_calibration_error(sums), naive_ece(scores, targets, ECE_BINS), abs_tol=1e-12)
