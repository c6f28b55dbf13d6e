"""from_modules / branch round trips, per-branch initialisation, model stacking and layout helpers."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from helpers.tolerances import assert_close


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


PLAIN_FACTORIES = {
    gn.GroupedConv2d: lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    gn.GroupedLinear: lambda: nn.Linear(5, 3),
    gn.GroupedBatchNorm2d: lambda: nn.BatchNorm2d(4),
    gn.GroupedBatchNorm1d: lambda: nn.BatchNorm1d(4),
    gn.GroupedLayerNorm: lambda: nn.LayerNorm(4),
}


@pytest.mark.parametrize("cls", list(PLAIN_FACTORIES))
@given(k=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_from_modules_branch_round_trip_is_exact(cls, k, seed):
    torch.manual_seed(seed)
    plain = [PLAIN_FACTORIES[cls]() for _ in range(k)]
    for m in plain:  # give norms non-trivial parameters and statistics
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            with torch.no_grad():
                t.uniform_(0.5, 1.5)
    grouped = cls.from_modules(plain)
    assert grouped.branches == k
    for i, m in enumerate(plain):
        out = grouped.branch(i)
        assert type(out) is type(m)
        assert state_equal(out, m)
    again = cls.from_modules([grouped.branch(i) for i in range(k)])
    assert state_equal(again, grouped)


@pytest.mark.parametrize(
    "make_grouped, make_plain",
    [
        (lambda: gn.GroupedConv2d(3, 5, 3, branches=4, groups=1), lambda: nn.Conv2d(3, 5, 3)),
        (lambda: gn.GroupedConv2d(4, 6, (1, 3), branches=3, groups=2), lambda: nn.Conv2d(4, 6, (1, 3), groups=2)),
        (lambda: gn.GroupedLinear(7, 3, branches=4), lambda: nn.Linear(7, 3)),
    ],
)
def test_each_branch_is_initialised_exactly_as_its_torch_counterpart(make_grouped, make_plain):
    """Same seed: the grouped layer equals K torch layers built one after another (fan-in of one branch)."""
    torch.manual_seed(123)
    grouped = make_grouped()
    torch.manual_seed(123)
    plain = [make_plain() for _ in range(grouped.branches)]
    assert state_equal(grouped, type(grouped).from_modules(plain))


def test_from_modules_rejects_mismatched_branches():
    with pytest.raises(ValueError, match="module 1 is configured"):
        gn.GroupedConv2d.from_modules([nn.Conv2d(3, 4, 3), nn.Conv2d(3, 5, 3)])
    with pytest.raises(TypeError, match="expects Linear"):
        gn.GroupedLinear.from_modules([nn.Linear(3, 4), nn.Conv2d(3, 4, 1)])
    with pytest.raises(ValueError, match="empty"):
        gn.GroupedLinear.from_modules([])
    with pytest.raises(ValueError, match="padding_mode"):  # reflect & co. stack (tests/test_conventions.py)
        gn.GroupedConv2d(3, 4, 3, branches=2, padding=1, padding_mode="mirror")
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        gn.GroupedLinear(3, 4, branches=2).branch(2)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5),
    ).double()


@given(k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), train=st.booleans())
def test_stack_models_equals_the_loop_and_extracts_back(k, seed, train):
    torch.manual_seed(seed)
    models = [small_cnn().train(train) for _ in range(k)]
    grouped = gn.stack_models(models)
    assert gn.num_branches(grouped) == k
    x = torch.randn(3, k * 3, 10, 10, dtype=torch.float64)
    loop = gn.PerBranch(models)
    assert_close(grouped(x), loop(x), kind="reference")
    for i in range(k):
        out = gn.extract_branch(grouped, i)
        assert not any(gn.model_stacking.is_grouped_layer(m) for m in out.modules())
        assert state_equal(out, models[i])


def test_stack_models_rejects_different_architectures():
    a, b = small_cnn(), small_cnn()
    b[4] = nn.Conv2d(6, 9, 3, stride=2)
    with pytest.raises(ValueError, match=r"model\.4"):
        gn.stack_models([a, b])
    with pytest.raises(TypeError, match="no grouped counterpart"):
        gn.stack_models([nn.PReLU(), nn.PReLU()])


@given(k=st.integers(1, 5), c=st.integers(1, 4), n=st.integers(1, 3), channels_last=st.booleans())
def test_layout_stack_unstack_repeat(k, c, n, channels_last):
    views = [torch.randn(n, c, 4, 5) for _ in range(k)]
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    x = gn.stack(views)
    assert x.shape == (n, k * c, 4, 5)
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
    u = gn.unstack(x, k)
    assert u.shape == (k, n, c, 4, 5)
    for i in range(k):
        assert torch.equal(u[i], views[i])
        assert torch.equal(gn.branch_slice(x, i, k), views[i])
    r = gn.repeat(views[0], k)
    assert torch.equal(gn.unstack(r, k), views[0].expand(k, *views[0].shape))
    lin = torch.randn(n, k * c)
    assert torch.equal(gn.unstack(lin, k)[k - 1], lin[:, (k - 1) * c:])


def test_layout_errors():
    with pytest.raises(ValueError, match="not divisible by branches=4"):
        gn.unstack(torch.randn(2, 6, 3, 3), 4)
    with pytest.raises(ValueError, match="equal shapes"):
        gn.stack([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="positive int"):
        gn.repeat(torch.randn(2, 3), 0)
