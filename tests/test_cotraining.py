"""CoTrainingLoss (both backends) against the naive per-branch reference, its output, NaN/bad-input policy, and the
weight ramp. Kernel-only checks (dtypes, chunked large C, per-sample rows, opcheck) are in
tests/kernels/test_cotrain_loss.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.cotraining import CoTrainingLoss, CoTrainingOutput, CoTrainingWeightRamp
from groupnet.reference import cotraining_loss_reference
from helpers.cotraining_inputs import random_logits, random_targets
from helpers.tolerances import assert_close

BACKENDS = ["torch_backend", "triton_backend"]


@st.composite
def cases(draw):
    return dict(
        n=draw(st.integers(1, 6)),
        k=draw(st.integers(1, 8)),
        c=draw(st.integers(1, 40)),
        layout=draw(st.sampled_from(["nkc", "nkc_strided", "knc", "knc_permuted"])),
        targets=draw(st.sampled_from(["hard", "hard_ignore", "soft"])),
        divergence=draw(st.sampled_from(["js", "kl"])),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0, 3.0])),
        weight=draw(st.floats(0.0, 2.0, width=32)),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0, 30.0])),
        grad_out=draw(st.floats(-3.0, 3.0, width=32)),
        seed=draw(st.integers(0, 2**20)),
    )


def run_both(case, dtype=torch.float64, **loss_kwargs):
    """(module output, module grad, reference (loss, ce, div), reference grad) for one case."""
    n, k, c = case["n"], case["k"], case["c"]
    logits = random_logits(n, k, c, case["layout"], scale=case["scale"], dtype=dtype, seed=case["seed"])
    targets = random_targets(n, c, case["targets"], seed=case["seed"], dtype=dtype)
    hyper = dict(weight=case["weight"], divergence=case["divergence"], temperature=case["temperature"])
    loss_fn = CoTrainingLoss(k, **hyper, **loss_kwargs)
    x = logits.detach().clone().requires_grad_()
    out = loss_fn(x, targets)
    (grad,) = torch.autograd.grad(out.loss * case["grad_out"], x)
    x_ref = logits.detach().double().clone().requires_grad_()
    ref = cotraining_loss_reference(x_ref, targets.double() if targets.dim() == 2 else targets, k, **hyper)
    (grad_ref,) = torch.autograd.grad(ref[0] * case["grad_out"], x_ref)
    return out, grad, ref, grad_ref


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(case=cases())
def test_matches_per_branch_reference_float64(backend, case, request):
    request.getfixturevalue(backend)
    out, grad, ref, grad_ref = run_both(case)
    assert_close(out.loss, ref[0], kind="reference")
    assert_close(out.ce, ref[1], kind="reference")
    assert_close(out.divergence, ref[2], kind="reference")
    assert_close(grad, grad_ref, kind="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(case=cases())
def test_matches_reference_float32(backend, case, request):
    request.getfixturevalue(backend)
    out, grad, ref, grad_ref = run_both(case, dtype=torch.float32)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32
    scale = 1.0 + ref[0].abs().item()
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=2e-5, atol=2e-5 * scale)
    torch.testing.assert_close(out.ce.double(), ref[1], rtol=2e-5, atol=2e-5 * scale)
    torch.testing.assert_close(out.divergence.double(), ref[2], rtol=2e-5, atol=2e-5 * scale)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-5 * (1 + abs(case["grad_out"])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_all_ignored_batch_gives_zero_loss_and_zero_grad(backend, divergence, request):
    request.getfixturevalue(backend)
    logits = random_logits(3, 4, 7, "nkc").requires_grad_()
    targets = torch.full((3,), -100)
    out = CoTrainingLoss(4, divergence=divergence)(logits, targets)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.divergence.item() == 0.0
    assert torch.equal(out.ce, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_samples_do_not_count(backend, request):
    """The mean is over non-ignored samples: ignoring a sample equals dropping it from the batch."""
    request.getfixturevalue(backend)
    logits, targets = random_logits(5, 3, 6, "nkc"), random_targets(5, 6, "hard")
    targets[[1, 3]] = 7  # a custom ignore_index inside no class range
    loss_fn = CoTrainingLoss(3, ignore_index=7, weight=0.7)
    keep = torch.tensor([0, 2, 4])
    torch.testing.assert_close(loss_fn(logits, targets).loss, loss_fn(logits[keep], targets[keep]).loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, request):
    request.getfixturevalue(backend)
    logits = torch.zeros(0, 6, dtype=torch.float64, requires_grad=True)
    out = CoTrainingLoss(2)(logits, torch.zeros(0, dtype=torch.long))
    out.loss.backward()
    assert out.loss.item() == 0.0 and logits.grad.shape == (0, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_js_is_entropy_of_mean_minus_mean_entropy(backend, temperature, request):
    """D = H(mean_k p_k) - mean_k H(p_k), written with entropies instead of the KL form of the reference."""
    request.getfixturevalue(backend)
    k, c = 5, 9
    logits = random_logits(4, k, c, "nkc", seed=3)
    p = torch.softmax(logits.view(4, k, c) / temperature, dim=-1)
    entropy = lambda q: -torch.xlogy(q, q).sum(-1)  # noqa: E731
    expected = (entropy(p.mean(1)) - entropy(p).mean(1)).mean() * temperature**2
    out = CoTrainingLoss(k, temperature=temperature)(logits, random_targets(4, c, "hard"))
    torch.testing.assert_close(out.divergence, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_mean_pairwise_kl_as_in_splitnet(backend, request):
    """kl: 1/(K-1) sum over ordered pairs of batch-mean KL(p_j || p_i), from explicit probabilities."""
    request.getfixturevalue(backend)
    k, c, n = 3, 5, 4
    logits = random_logits(n, k, c, "knc", seed=5)
    p = torch.softmax(logits, dim=-1)
    pairs = [(p[j] * (p[j].log() - p[i].log())).sum(-1).mean() for i in range(k) for j in range(k) if i != j]
    out = CoTrainingLoss(k, divergence="kl")(logits, random_targets(n, c, "hard"))
    torch.testing.assert_close(out.divergence, sum(pairs) / (k - 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_branch_is_plain_cross_entropy(backend, request):
    request.getfixturevalue(backend)
    logits, targets = random_logits(6, 1, 11, "nkc"), random_targets(6, 11, "hard_ignore")
    targets[0] = 3
    out = CoTrainingLoss(1, weight=2.0)(logits, targets)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, targets))
    assert out.divergence.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixup_soft_target_equals_mixed_hard_losses(backend, request):
    """lam * loss(y_a) + (1 - lam) * loss(y_b) == loss(lam * onehot(y_a) + (1 - lam) * onehot(y_b))."""
    request.getfixturevalue(backend)
    k, c, lam = 3, 8, 0.3
    logits = random_logits(5, k, c, "nkc", seed=9)
    y_a, y_b = random_targets(5, c, "hard", seed=1), random_targets(5, c, "hard", seed=2)
    soft = lam * F.one_hot(y_a, c).double() + (1 - lam) * F.one_hot(y_b, c).double()
    loss_fn = CoTrainingLoss(k, temperature=2.0)
    mixed = lam * loss_fn(logits, y_a).loss + (1 - lam) * loss_fn(logits, y_b).loss
    torch.testing.assert_close(loss_fn(logits, soft).loss, mixed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targets_kind", ["hard", "soft"])
@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_extreme_logits_stay_finite(backend, dtype, targets_kind, divergence, request):
    request.getfixturevalue(backend)
    k, c, n = 3, 13, 4
    logits = random_logits(n, k, c, "nkc", seed=11)
    logits = (torch.sign(logits) * 1e4 * (logits.abs() > 1)).to(dtype)  # entries in {-1e4, 0, 1e4}
    targets = random_targets(n, c, targets_kind, dtype=dtype)
    hyper = dict(weight=0.5, divergence=divergence, temperature=0.5)
    x = logits.clone().requires_grad_()
    out = CoTrainingLoss(k, **hyper)(x, targets)
    out.loss.backward()
    for t in (out.loss, out.ce, out.divergence, x.grad):
        assert torch.isfinite(t).all()
    x_ref = logits.double().requires_grad_()
    ref = cotraining_loss_reference(x_ref, targets.double() if targets.dim() == 2 else targets, k, **hyper)
    ref[0].backward()
    # losses are ~1e4 here: fp32 is held to its relative precision, fp64 to ~1e-12.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-12, 1e-10)
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_compute_in_float32(backend, dtype, request):
    request.getfixturevalue(backend)
    logits = random_logits(4, 2, 10, "nkc", dtype=dtype).requires_grad_()
    targets = random_targets(4, 10, "hard")
    out = CoTrainingLoss(2)(logits, targets)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and logits.grad.dtype == dtype
    x_ref = logits.detach().double().requires_grad_()
    ref = cotraining_loss_reference(x_ref, targets, 2, weight=0.5)
    ref[0].backward()
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-5, atol=1e-5)
    resolution = 1e-3 if dtype == torch.float16 else 8e-3
    torch.testing.assert_close(logits.grad.double(), x_ref.grad, rtol=resolution, atol=1e-4)


def test_output_fields_and_consistency():
    k = 4
    loss_fn = CoTrainingLoss(k, weight=0.25, temperature=2.0)
    logits = random_logits(5, k, 6, "nkc").requires_grad_()
    out = loss_fn(logits, random_targets(5, 6, "hard"))
    assert isinstance(out, CoTrainingOutput)
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.ce.shape == (k,) and not out.ce.requires_grad and not out.divergence.requires_grad
    assert out.weight == 0.25
    torch.testing.assert_close(out.loss.detach(), out.ce.sum() + out.weight * out.divergence)


def test_soft_targets_get_no_gradient():
    targets = random_targets(3, 5, "soft").requires_grad_()
    logits = random_logits(3, 2, 5, "nkc").requires_grad_()
    CoTrainingLoss(2)(logits, targets).loss.backward()
    assert targets.grad is None and logits.grad is not None


def test_cpu_tensors_use_the_torch_path_by_default(monkeypatch):
    import groupnet.kernels.cotrain_loss as kernel_module

    from groupnet.ops import use_backend

    def fail(*args, **kwargs):
        raise AssertionError("the kernel must not run on CPU tensors by default")

    monkeypatch.setattr(kernel_module, "cotrain_loss", fail)
    with use_backend("auto"):
        CoTrainingLoss(2)(random_logits(2, 2, 3, "nkc"), random_targets(2, 3, "hard"))


def test_triton_backend_runs_the_kernel(triton_backend, monkeypatch):
    import groupnet.kernels.cotrain_loss as kernel_module

    calls = []
    real = kernel_module.cotrain_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "cotrain_loss", spy)
    CoTrainingLoss(2, divergence="kl")(random_logits(2, 2, 3, "nkc"), random_targets(2, 3, "hard"))
    assert len(calls) == 1 and calls[0]["divergence"] == "kl"


# --- NaN policy and bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(backend, bad, request):
    request.getfixturevalue(backend)
    logits = random_logits(3, 2, 4, "nkc")
    logits[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        CoTrainingLoss(2)(logits, random_targets(3, 4, "hard"))


def test_non_finite_soft_targets_raise():
    targets = random_targets(3, 4, "soft")
    targets[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        CoTrainingLoss(2)(random_logits(3, 2, 4, "nkc"), targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_nan_logits_give_nan_loss(backend, request):
    request.getfixturevalue(backend)
    logits = random_logits(3, 2, 4, "nkc")
    logits[0, 0] = float("nan")
    out = CoTrainingLoss(2, check_finite=False)(logits, random_targets(3, 4, "hard"))
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_target", [-1, 4, 1000])
def test_targets_out_of_range_raise(backend, bad_target, request):
    request.getfixturevalue(backend)
    targets = random_targets(3, 4, "hard")
    targets[2] = bad_target
    with pytest.raises(ValueError, match=rf"targets must be in \[0, 4\).*\[{bad_target}\]"):
        CoTrainingLoss(2)(random_logits(3, 2, 4, "nkc"), targets)


@pytest.mark.parametrize(
    "logits_shape, targets, match",
    [
        ((3, 7), torch.zeros(3, dtype=torch.long), r"width 7 is not a positive multiple of 2"),
        ((3, 4, 5), torch.zeros(4, dtype=torch.long), r"\(K, N, C\) with K=2, got shape \(3, 4, 5\)"),
        ((2, 3, 4, 5), torch.zeros(3, dtype=torch.long), r"\(N, K\*C\) or \(K, N, C\)"),
        ((3, 8), torch.zeros(4, dtype=torch.long), r"targets have shape \(4,\), expected \(3,\)"),
        ((3, 8), torch.zeros(3, 5), r"soft targets have shape \(3, 5\), expected \(N, C\) = \(3, 4\)"),
        ((3, 8), torch.zeros(3, 4, 1), r"\(N,\) class indices or \(N, C\) soft targets"),
    ],
)
def test_bad_shapes_raise(logits_shape, targets, match):
    with pytest.raises(ValueError, match=match):
        CoTrainingLoss(2)(torch.zeros(logits_shape), targets)


def test_bad_dtypes_and_devices_raise():
    loss_fn = CoTrainingLoss(2)
    with pytest.raises(TypeError, match="floating-point logits, got torch.int64"):
        loss_fn(torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="hard targets .* integer dtype, got torch.float32"):
        loss_fn(torch.zeros(3, 8), torch.zeros(3))
    with pytest.raises(TypeError, match="soft targets .* floating point, got torch.int64"):
        loss_fn(torch.zeros(3, 8), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="logits are on cpu but targets on meta"):
        loss_fn(torch.zeros(3, 8), torch.zeros(3, dtype=torch.long, device="meta"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(branches=0), "branches must be a positive int"),
        (dict(branches=2, divergence="mse"), "divergence must be one of"),
        (dict(branches=2, temperature=0.0), "temperature must be > 0"),
        (dict(branches=2, temperature=float("nan")), "temperature must be a finite number"),
        (dict(branches=2, weight=-0.1), "weight must be >= 0"),
        (dict(branches=2, ignore_index=1.5), "ignore_index must be an int"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoTrainingLoss(**kwargs)


# --- the weight ramp ------------------------------------------------------------------------------------------------


def splitnet_weight(epoch: int, final: float = 0.5, warmup: int = 40, floor: float = 0.005) -> float:
    """The co-training weight ramp of the SplitNet code (train_split.py), written out per epoch: ``final * epoch /
    warmup`` (at least ``floor``) for the first ``warmup`` epochs, then ``final``."""
    return max(final * epoch / warmup, floor) if epoch < warmup else final


def test_ramp_follows_splitnet_per_epoch_and_sets_the_loss_weight():
    loss_fn = CoTrainingLoss(2)
    ramp = CoTrainingWeightRamp(loss_fn)
    seen = [loss_fn.weight]
    for _ in range(50):
        assert ramp.step() == loss_fn.weight
        seen.append(loss_fn.weight)
    assert seen == pytest.approx([splitnet_weight(e) for e in range(51)], abs=1e-15)
    assert seen[0] == 0.005 and seen[20] == pytest.approx(0.25) and seen[40:] == [0.5] * 11


def test_ramp_is_linear_with_fractional_epochs_and_clamped():
    ramp = CoTrainingWeightRamp(final=1.0, start=0.1, warmup_epochs=10)
    assert ramp.step(0.05) == 0.1  # clamped at start
    assert ramp.step(2.5) == pytest.approx(0.25)
    assert ramp.step(9.99) == pytest.approx(0.999)
    assert ramp.step(10.0) == 1.0 and ramp.step(1e6) == 1.0
    assert CoTrainingWeightRamp(final=0.3, warmup_epochs=0).weight == 0.3


def test_ramp_state_dict_round_trip_resumes_exactly():
    loss_a, loss_b = CoTrainingLoss(2), CoTrainingLoss(2)
    ramp_a = CoTrainingWeightRamp(loss_a, final=0.8, start=0.01, warmup_epochs=7)
    for i in range(13):
        ramp_a.step(i * 0.37)
    state = ramp_a.state_dict()
    ramp_b = CoTrainingWeightRamp(loss_b)  # default schedule, replaced by the checkpoint's
    ramp_b.load_state_dict(state)
    assert ramp_b.state_dict() == state and loss_b.weight == loss_a.weight
    for _ in range(10):
        assert ramp_a.step() == ramp_b.step()
        assert loss_a.weight == loss_b.weight


def test_ramp_bad_arguments_raise():
    with pytest.raises(ValueError, match="start .* must not exceed final"):
        CoTrainingWeightRamp(final=0.1, start=0.2)
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        CoTrainingWeightRamp(warmup_epochs=-1)
    with pytest.raises(ValueError, match="epoch must be a finite number"):
        CoTrainingWeightRamp().step(math.inf)
    with pytest.raises(KeyError, match="must have keys"):
        CoTrainingWeightRamp().load_state_dict({"epoch": 1.0})


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)
@given(n=st.integers(1, 6), k=st.integers(1, 4), c=st.integers(2, 12), eps=st.floats(0.0, 0.9),
       targets=st.sampled_from(["hard", "hard_ignore", "soft"]), divergence=st.sampled_from(["js", "kl"]),
       weight=st.floats(0.0, 2.0), seed=st.integers(0, 2**20))
def test_label_smoothing_is_torch_cross_entropy_with_label_smoothing(backend, n, k, c, eps, targets, divergence,
                                                                     weight, seed, request):
    request.getfixturevalue(backend)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k * c, generator=g, dtype=torch.float64, requires_grad=True)
    if targets == "soft":
        y = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    else:
        y = torch.randint(0, c, (n,), generator=g)
        if targets == "hard_ignore":
            y[torch.rand(n, generator=g) < 0.4] = -100
    out = CoTrainingLoss(k, weight=weight, divergence=divergence, label_smoothing=eps)(logits, y)
    plain = CoTrainingLoss(k, weight=weight, divergence=divergence)(logits, y)
    per_branch = logits.unflatten(1, (k, c)).transpose(0, 1)  # (K, N, C)

    def ce_of(smoothing: float) -> torch.Tensor:  # (K,), differentiable: torch's cross-entropy per branch
        if targets == "soft":
            return torch.stack([F.cross_entropy(per_branch[i], y, label_smoothing=smoothing) for i in range(k)])
        total = torch.stack([F.cross_entropy(per_branch[i], y, label_smoothing=smoothing, reduction="sum")
                             for i in range(k)])
        return total / (y != -100).sum().clamp(min=1)

    ce = ce_of(eps)
    assert_close(out.ce, ce.detach(), kind="reference")
    assert_close(out.divergence, plain.divergence, kind="reference")  # smoothing leaves the divergence alone
    expected = ce.sum() + (plain.loss - ce_of(0.0).sum())  # smoothed CE + the unchanged weighted divergence
    assert_close(out.loss, expected, kind="reference")
    (grad,) = torch.autograd.grad(out.loss, logits)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    assert_close(grad, grad_expected, kind="reference")


def test_label_smoothing_is_checked():
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="label_smoothing"):
            CoTrainingLoss(2, label_smoothing=bad)
    assert "label_smoothing=0.1" in repr(CoTrainingLoss(2, label_smoothing=0.1))
