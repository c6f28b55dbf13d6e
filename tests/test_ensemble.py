"""Ensemble prediction modes and the per-branch view, against hand-written per-branch loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.ensembling import ensemble, split_branches


def branch_list(n, k, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64) * scale for _ in range(k)]


def hand_written(branch_logits, mode):
    """Per-branch loop with explicit probabilities (no log-space tricks): what each mode is documented to be."""
    k = len(branch_logits)
    probs = [torch.softmax(z, dim=-1) for z in branch_logits]
    if mode == "logits":
        return sum(branch_logits) / k, "logits"
    if mode == "probs":
        return sum(probs) / k, "probs"
    product = probs[0]
    for p in probs[1:]:
        product = product * p
    root = product ** (1.0 / k)
    return root / root.sum(-1, keepdim=True), "probs"


@settings(max_examples=40)
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 6),
    c=st.integers(1, 12),
    mode=st.sampled_from(["logits", "probs", "geometric"]),
    stacked=st.sampled_from(["nkc", "knc"]),
    seed=st.integers(0, 2**20),
)
def test_modes_match_hand_written_loops(n, k, c, mode, stacked, seed):
    per_branch = branch_list(n, k, c, seed)
    logits = torch.cat(per_branch, dim=1) if stacked == "nkc" else torch.stack(per_branch)
    scores = ensemble(logits, k, mode=mode)
    expected, kind = hand_written(per_branch, mode)
    assert scores.shape == (n, c)
    if kind == "logits":
        torch.testing.assert_close(scores, expected)
    else:  # normalised log-probabilities
        torch.testing.assert_close(scores.exp(), expected)
        torch.testing.assert_close(torch.logsumexp(scores, -1), torch.zeros(n, dtype=torch.float64))
    # the documented contract in every mode: softmax gives the predictive distribution, argmax the prediction
    probs = torch.softmax(scores, -1)
    torch.testing.assert_close(probs, torch.softmax(expected, -1) if kind == "logits" else expected)


def test_geometric_mean_matches_splitnet_sqrt_argmax():
    """SplitNet's latency script takes sqrt(prod p_k) whatever K; the prediction is the same."""
    per_branch = branch_list(50, 3, 10, seed=1)
    product = torch.stack([torch.softmax(z, -1) for z in per_branch]).prod(0)
    scores = ensemble(torch.cat(per_branch, 1), 3, mode="geometric")
    assert torch.equal(scores.argmax(-1), product.sqrt().argmax(-1))


def test_ensemble_is_differentiable():
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    for mode in ("logits", "probs", "geometric"):
        assert torch.autograd.gradcheck(lambda x, m=mode: ensemble(x, 2, mode=m), (logits,))


def test_split_branches_is_a_view_of_each_branch():
    per_branch = branch_list(4, 3, 5, seed=2)
    logits = torch.cat(per_branch, dim=1)
    view = split_branches(logits, 3)
    assert view.shape == (3, 4, 5) and view.data_ptr() == logits.data_ptr()
    for k in range(3):
        assert torch.equal(view[k], per_branch[k])
    stacked = torch.stack(per_branch)
    assert split_branches(stacked, 3) is stacked


def test_extreme_logits_are_handled_in_log_space():
    """Two confident branches that disagree: p_0 = onehot(0), p_1 = onehot(1) (|z| = 1e4)."""
    logits = torch.tensor([[1e4, -1e4, 0.0, -1e4, 1e4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ensemble(logits, 2, mode="logits"), torch.zeros(1, 3, dtype=torch.float64))
    probs = ensemble(logits, 2, mode="probs")  # log(0.5, 0.5, 0): the impossible class is -inf, not NaN
    torch.testing.assert_close(probs.exp(), torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    assert not torch.isnan(probs).any()
    geometric = ensemble(logits, 2, mode="geometric")  # every class has mean log-prob -1e4: uniform
    torch.testing.assert_close(geometric.exp(), torch.full((1, 3), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "shape, branches, mode, error, match",
    [
        ((4, 7), 2, "logits", ValueError, r"width 7 is not a positive multiple of 2"),
        ((3, 4, 5), 2, "logits", ValueError, r"\(K, N, C\) with K=2, got shape \(3, 4, 5\)"),
        ((8,), 2, "logits", ValueError, r"\(N, K\*C\) or \(K, N, C\), got shape \(8,\)"),
        ((4, 8), 0, "logits", ValueError, r"branches must be a positive int, got 0"),
        ((4, 8), 2, "max", ValueError, r"mode must be one of \('logits', 'probs', 'geometric'\), got 'max'"),
    ],
)
def test_bad_input_raises(shape, branches, mode, error, match):
    with pytest.raises(error, match=match):
        ensemble(torch.zeros(shape), branches, mode=mode)


def test_integer_logits_raise():
    with pytest.raises(TypeError, match="floating-point logits, got torch.int64"):
        ensemble(torch.zeros(2, 4, dtype=torch.long), 2)
