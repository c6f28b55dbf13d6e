"""The fused co-training loss kernel (run by the Triton interpreter on CPU tensors) against the naive per-branch
reference: per-sample outputs and gradients, chunked rows, input dtypes, large C, the custom-op contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.cotraining import CoTrainingLoss
from groupnet.kernels import cotrain_loss as kernel_module
from groupnet.kernels.cotrain_loss import cotrain_loss, launch_config
from groupnet.reference import cotraining_loss_reference
from helpers.cotraining_inputs import random_logits, random_targets
from helpers.tolerances import assert_close

def draw_targets(n, c, *, soft, ignore, seed):
    """Soft targets as a non-contiguous view (rows unnormalised for odd seeds), or class indices, about 35% of them
    ignored if ``ignore``."""
    kind = "soft_view" if soft else "hard_ignore" if ignore else "hard"
    return random_targets(n, c, kind, seed=seed, seed_offset=7, ignore_fraction=0.35)


def reference_rows(logits, targets, k, **hyper):
    """Per-sample (loss, ce (K,), divergence) from the reference run on one sample at a time, in fp64."""
    x = logits.detach().double()
    rows = []
    for i in range(targets.shape[0]):
        xi = x[i : i + 1] if x.dim() == 2 else x[:, i : i + 1]
        ti = targets[i : i + 1].double() if targets.dim() == 2 else targets[i : i + 1]
        rows.append(cotraining_loss_reference(xi, ti, k, **hyper))
    loss, ce, div = zip(*rows)
    return torch.stack(loss), torch.stack(ce), torch.stack(div)


def reference_grad(logits, targets, k, row_weights, **hyper):
    """d(sum_n w_n loss_n)/d logits from the reference (fp64)."""
    x = logits.detach().double().requires_grad_()
    total = 0.0
    for i in range(targets.shape[0]):
        xi = x[i : i + 1] if x.dim() == 2 else x[:, i : i + 1]
        ti = targets[i : i + 1].double() if targets.dim() == 2 else targets[i : i + 1]
        total = total + row_weights[i] * cotraining_loss_reference(xi, ti, k, **hyper)[0]
    (grad,) = torch.autograd.grad(total, x)
    return grad


def check_against_reference(n, k, c, *, layout, soft, ignore, divergence, temperature, weight, scale, dtype, seed,
                            block_c=0, class_splits=0):
    logits = random_logits(n, k, c, layout, scale=scale, dtype=dtype, seed=seed, row_pad=5).requires_grad_()
    targets = draw_targets(n, c, soft=soft, ignore=ignore, seed=seed)
    hyper = dict(weight=weight, divergence=divergence, temperature=temperature)
    loss, ce, div = cotrain_loss(logits, targets, branches=k, block_c=block_c, class_splits=class_splits, **hyper)
    row_weights = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((loss * row_weights.to(loss.dtype)).sum(), logits)
    ref_loss, ref_ce, ref_div = reference_rows(logits, targets, k, **hyper)
    ref_grad = reference_grad(logits, targets, k, row_weights, **hyper)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(loss, ref_loss, dtype, kind="cotrain_loss", what="loss")
    assert_close(ce, ref_ce, dtype, kind="cotrain_loss", what="ce")
    assert_close(div, ref_div, dtype, kind="cotrain_loss", what="divergence")
    assert_close(grad, ref_grad, dtype, kind="cotrain_grad", what="grad")


@settings(max_examples=30)
@given(
    n=st.integers(1, 5),
    k=st.integers(1, 8),
    c=st.integers(1, 70),
    layout=st.sampled_from(["nkc_strided", "knc_permuted"]),
    soft=st.booleans(),
    ignore=st.booleans(),
    divergence=st.sampled_from(["js", "kl"]),
    temperature=st.sampled_from([1.0, 0.5, 1.5, 4.0]),
    weight=st.floats(0.0, 3.0, width=32),
    scale=st.sampled_from([0.01, 1.0, 8.0, 50.0]),
    block_c=st.sampled_from([0, 16, 32]),  # 16/32 split most rows into several chunks
    seed=st.integers(0, 2**20),
)
def test_per_sample_outputs_and_gradients_float64(n, k, c, layout, soft, ignore, divergence, temperature, weight,
                                                   scale, block_c, seed):
    check_against_reference(n, k, c, layout=layout, soft=soft, ignore=ignore, divergence=divergence,
                            temperature=temperature, weight=weight, scale=scale, dtype=torch.float64, seed=seed,
                            block_c=block_c)


@settings(max_examples=8)
@given(
    n=st.integers(1, 3),
    k=st.integers(1, 4),
    c=st.integers(17, 64),
    layout=st.sampled_from(["nkc_strided", "knc_permuted"]),
    soft=st.booleans(),
    ignore=st.booleans(),
    divergence=st.sampled_from(["js", "kl"]),
    temperature=st.sampled_from([1.0, 0.5, 4.0]),
    weight=st.floats(0.0, 3.0, width=32),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    class_splits=st.integers(2, 6),
    seed=st.integers(0, 2**20),
)
def test_class_split_path_float64(n, k, c, layout, soft, ignore, divergence, temperature, weight, scale,
                                  class_splits, seed):
    """The class-split path (per-chunk partial statistics combined across programs) with BLOCK_C = 16, so each
    sample's classes spread over 2-6 chunks, the last one ragged, against the float64 reference."""
    assert kernel_module.class_splits_for(n, k, c, 16, None, class_splits) > 1
    check_against_reference(n, k, c, layout=layout, soft=soft, ignore=ignore, divergence=divergence,
                            temperature=temperature, weight=weight, scale=scale, dtype=torch.float64, seed=seed,
                            block_c=16, class_splits=class_splits)


@pytest.mark.parametrize("dtype, divergence", [(torch.float32, "js"), (torch.bfloat16, "kl")])
def test_class_split_path_input_dtypes_and_extreme_logits(dtype, divergence):
    """16-bit and fp32 logits on the split path; then |z| = 1e4 with the running max in a different chunk per
    branch (the merge of per-chunk maxima), finite and equal to the one-program path."""
    check_against_reference(3, 3, 50, layout="nkc_strided", soft=False, ignore=True, divergence=divergence,
                            temperature=2.0, weight=0.5, scale=3.0, dtype=dtype, seed=5, block_c=16, class_splits=3)
    n, k, c = 2, 3, 50
    logits = random_logits(n, k, c, "nkc_strided", row_pad=5, scale=1.0, dtype=torch.float64, seed=6)
    logits = (torch.round(logits) * 5e3).clamp(-1e4, 1e4).to(torch.float32)
    targets = draw_targets(n, c, soft=False, ignore=False, seed=6)
    hyper = dict(branches=k, weight=1.0, temperature=0.5, divergence=divergence, block_c=16)
    split = cotrain_loss(logits, targets, class_splits=4, **hyper)
    single = cotrain_loss(logits, targets, class_splits=1, **hyper)
    for a, b in zip(split, single):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_class_split_choice():
    """Automatic: no split without an SM count or with enough samples; else enough chunks for two programs per
    SM, at most one chunk per class block and within the partial-tile bound."""
    splits = kernel_module.class_splits_for
    assert splits(64, 2, 1000, 512, None) == 1
    assert splits(264, 2, 100000, 512, 132) == 1
    assert splits(64, 2, 100000, 512, 132) == 5  # 64 x 5 = 320 programs >= 2 x 132
    assert splits(1, 2, 1000, 512, 132) == 2  # two class blocks
    assert splits(1, 128, 10**6, 16, 132) == kernel_module.MAX_CLASS_SPLIT_TILE // 128
    assert splits(4, 2, 100, 16, None, requested=3) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_input_dtypes(dtype, soft, divergence):
    check_against_reference(4, 3, 37, layout="nkc_strided", soft=soft, ignore=not soft, divergence=divergence,
                            temperature=2.0, weight=0.5, scale=3.0, dtype=dtype, seed=1, block_c=16)


@pytest.mark.parametrize("soft, divergence", [(False, "js"), (True, "kl")])
def test_large_class_count_uses_the_chunked_path(soft, divergence):
    n, k, c = 2, 2, 33000
    assert launch_config(k, c, torch.float32)["BLOCK_C"] < c  # more than one chunk per row
    check_against_reference(n, k, c, layout="knc_permuted", soft=soft, ignore=False, divergence=divergence,
                            temperature=1.5, weight=0.5, scale=4.0, dtype=torch.float32, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_extreme_logits_in_chunks(dtype, divergence):
    """|z| = 1e4 spread over several chunks, the running max changing from chunk to chunk."""
    n, k, c = 3, 4, 50
    logits = random_logits(n, k, c, "nkc_strided", row_pad=5, scale=1.0, dtype=torch.float64, seed=4)
    logits = (torch.round(logits) * 5e3).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    targets = draw_targets(n, c, soft=False, ignore=False, seed=4)
    loss, _ce, _div = cotrain_loss(logits, targets, branches=k, weight=1.0, temperature=0.5, divergence=divergence,
                                   block_c=16)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    ref = reference_rows(logits, targets, k, weight=1.0, temperature=0.5, divergence=divergence)[0]
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=rtol)


def test_no_reads_outside_the_logits():
    """Logits as an interior view of a NaN-filled buffer: any out-of-bounds read would make the outputs NaN."""
    n, k, c = 3, 3, 21
    buffer = torch.full((n + 2, k * c + 9), float("nan"), dtype=torch.float64)
    logits = buffer[1 : n + 1, 4 : 4 + k * c]
    logits.copy_(random_logits(n, k, c, "nkc_strided", row_pad=5, scale=2.0, dtype=torch.float64, seed=3))
    logits.requires_grad_()
    loss, ce, div = cotrain_loss(logits, torch.tensor([0, 20, 7]), branches=k, weight=0.5, block_c=16)
    loss.sum().backward()
    for t in (loss, ce, div, logits.grad):
        assert torch.isfinite(t).all()


def test_unchecked_out_of_range_target_gives_nan_for_that_sample_only(triton_backend):
    logits = random_logits(3, 2, 5, "nkc_strided", row_pad=5, scale=1.0, dtype=torch.float32, seed=0).requires_grad_()
    loss, ce, div = cotrain_loss(logits, torch.tensor([1, 9, -100]), branches=2, weight=0.5)
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(ce[1]).all() and torch.isnan(logits.grad[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(logits.grad[[0, 2]]).all()
    assert loss[2].item() == 0.0 and torch.equal(logits.grad[2], torch.zeros(10))
    out = CoTrainingLoss(2, check_targets=False)(logits, torch.tensor([1, 9, -100]))
    assert torch.isnan(out.loss)


def test_no_gradient_buffer_without_autograd():
    logits = random_logits(2, 2, 5, "nkc_strided", row_pad=5, scale=1.0, dtype=torch.float32, seed=0)
    *_, grad = torch.ops.groupnet.cotrain_loss_forward(logits, torch.tensor([0, 1]), 2, 0.5, 1.0, -100, "js", False, 0)
    assert grad.numel() == 0
    with torch.no_grad():
        loss, _, _ = cotrain_loss(logits.requires_grad_(), torch.tensor([0, 1]), branches=2, weight=0.5)
    assert not loss.requires_grad


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("compute_grad", [False, True])
def test_custom_op_contract(soft, compute_grad):
    """Schema, fake (meta) implementation and dispatch of the custom op (torch.library.opcheck)."""
    logits = random_logits(3, 2, 7, "knc_permuted", scale=1.0, dtype=torch.float32, seed=0)
    targets = draw_targets(3, 7, soft=soft, ignore=not soft, seed=0)
    if soft:
        targets = targets.float()
    args = (logits, targets, 2, 0.5, 2.0, -100, "kl", compute_grad, 16)
    torch.library.opcheck(torch.ops.groupnet.cotrain_loss_forward.default, args)


def test_kernel_rejects_unknown_divergence():
    with pytest.raises(ValueError, match=r"supports divergence in \('js', 'kl'\), got 'mse'"):
        cotrain_loss(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), branches=2, weight=0.5, divergence="mse")


def test_more_branches_than_the_kernel_takes(triton_backend, monkeypatch):
    """K > MAX_BRANCHES: the kernel refuses with a clear error and CoTrainingLoss falls back to the torch path."""
    k = kernel_module.MAX_BRANCHES + 1
    logits, targets = torch.randn(2, k * 3, dtype=torch.float64), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=rf"up to {k - 1} branches, got {k}"):
        cotrain_loss(logits, targets, branches=k, weight=0.5)
    out = CoTrainingLoss(k)(logits, targets)
    torch.testing.assert_close(out.loss, cotraining_loss_reference(logits, targets, k, weight=0.5)[0])


def test_launch_config_validates_block_c_and_bounds_the_tile():
    with pytest.raises(ValueError, match="block_c must be a power of two, got 24"):
        launch_config(2, 100, torch.float32, block_c=24)
    for k in (1, 3, 8, 64, kernel_module.MAX_BRANCHES):
        for c in (1, 10, 1000, 50000):
            cfg = launch_config(k, c, torch.float32)
            assert cfg["BLOCK_K"] >= k and cfg["BLOCK_C"] >= min(c, 16)
            assert cfg["BLOCK_K"] * cfg["BLOCK_C"] <= max(2048, cfg["BLOCK_K"] * 16)


def test_module_on_triton_backend_matches_cross_entropy_for_one_branch(triton_backend):
    logits = random_logits(5, 1, 9, "nkc_strided", row_pad=5, scale=2.0, dtype=torch.float64, seed=8).requires_grad_()
    targets = draw_targets(5, 9, soft=False, ignore=True, seed=8)
    targets[0] = 2
    out = CoTrainingLoss(1)(logits, targets)
    x = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(x, targets)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(logits.grad, x.grad)
