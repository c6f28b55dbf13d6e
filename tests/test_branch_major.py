"""Branch-major execution equals the grouped forward: outputs, gradients of every stacked parameter, running
statistics and batch counters (float64, train and eval mode, per-branch and shared input); the ``auto`` rule; errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from groupnet.branch_major import branch_major_forward, last_level_cache_bytes, prefer_branch_major
from groupnet.models import build_model

FAMILIES = {
    "small_cnn": ("small_cnn", {}),
    "resnet_basic": ("resnet20", {"depths": (1, 1, 1)}),
    "resnet_bottleneck": ("resnet164", {"depths": (1, 1, 1)}),
    "wrn": ("wrn-16-2", {"depths": (1, 1, 1)}),
}


def pair(family: str, branches: int, momentum: float | None):
    arch, overrides = FAMILIES[family]
    grouped = build_model(arch, branches=branches, num_classes=5, **overrides).double()
    for m in grouped.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            with torch.no_grad():  # non-trivial statistics and affine parameters, different per branch
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    branch = copy.deepcopy(grouped)
    grouped.execution_order, branch.execution_order = "grouped", "branch"
    return grouped, branch


@settings(max_examples=12)
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    branches=st.integers(2, 3),
    batch=st.integers(2, 4),
    training=st.booleans(),
    shared=st.booleans(),
    momentum=st.sampled_from([0.1, None]),
    seed=st.integers(0, 2**16),
)
def test_branch_major_equals_grouped(family, branches, batch, training, shared, momentum, seed):
    torch.manual_seed(seed)
    grouped, branch = pair(family, branches, momentum)
    grouped.train(training), branch.train(training)
    x = torch.randn(batch, 3 if shared else branches * 3, 8, 8, dtype=torch.float64)
    for step in range(2):  # the second step sees the running statistics the first one updated
        want, got = grouped(x), branch(x)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        want.backward(g), got.backward(g)
    for (name, p), q in zip(grouped.named_parameters(), branch.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"grad of {name}: {m}")
    for (name, b), b2 in zip(grouped.named_buffers(), branch.buffers()):
        torch.testing.assert_close(b2, b, msg=lambda m: f"buffer {name}: {m}")


def test_channels_last_output_and_stacked_user_model():
    torch.manual_seed(0)
    plain = [nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(3)]
    grouped = gn.stack_models(plain).double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got = branch_major_forward(grouped, x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, gn.PerBranch(plain).double()(x))


def test_model_with_a_parameter_outside_grouped_layers_is_refused():
    model = gn.stack_models([nn.Sequential(nn.Linear(3, 2)) for _ in range(2)])
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match="outside|inside a grouped layer"):
        branch_major_forward(model, torch.randn(4, 6))


def test_bad_execution_order_and_indivisible_input_are_named():
    model = build_model("small_cnn", branches=2, num_classes=3, in_channels=1)
    model.execution_order = "branch"
    with pytest.raises(ValueError, match=r"expects \(N, 2, H, W\).*got shape \(2, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8))
    model.execution_order = "sideways"
    with pytest.raises(ValueError, match="execution_order must be one of"):
        model(torch.randn(2, 2, 8, 8))
    with pytest.raises(ValueError, match="not divisible by 2 branches"):
        branch_major_forward(model, torch.randn(2, 3, 8, 8))


def test_schedule_is_a_deprecated_alias_of_execution_order():
    """Code written against the old attribute name keeps working, with a DeprecationWarning on each use."""
    from groupnet.branch_major import EXECUTION_ORDERS

    assert EXECUTION_ORDERS == ("auto", "grouped", "branch")
    model = build_model("small_cnn", branches=2, num_classes=3, in_channels=1)
    with pytest.warns(DeprecationWarning, match="execution_order"):
        model.schedule = "branch"
    assert model.execution_order == "branch"
    with pytest.warns(DeprecationWarning, match="execution_order"):
        assert model.schedule == "branch"
    model.execution_order = "grouped"
    with pytest.warns(DeprecationWarning):
        assert model.schedule == "grouped"


def test_auto_rule_switches_at_half_the_last_level_cache():
    half = last_level_cache_bytes() // 2
    assert last_level_cache_bytes() >= 1 << 20
    cpu = torch.device("cpu")
    assert not prefer_branch_major(half, cpu) and prefer_branch_major(half + 1, cpu)
    assert not prefer_branch_major(half + 1, torch.device("meta"))  # only the CPU has that cache trade-off
    model = build_model("wrn-16-4", branches=4, num_classes=10, depths=(1, 1, 1))  # 32 channels per branch
    per_sample = 4 * 32 * 32 * 32 * 4  # K * width * H * W * fp32 bytes
    small, large = half // per_sample, half // per_sample + 1
    assert not model._runs_branch_major(torch.empty(small, 12, 32, 32))
    assert model._runs_branch_major(torch.empty(large, 12, 32, 32))
    model.execution_order = "grouped"
    assert not model._runs_branch_major(torch.empty(large, 12, 32, 32))


def small_model_after_one_branch_major_forward():
    torch.manual_seed(0)
    model = build_model("small_cnn", branches=2, num_classes=3).double()
    model.execution_order = "branch"
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    model(x)  # makes the plan that the changes below must invalidate
    return model, x


def test_modules_replaced_after_a_forward_are_used():
    model, x = small_model_after_one_branch_major_forward()
    model.head = gn.GroupedLinear(model.head.in_features, 3, branches=2).double()  # e.g. a new head for fine-tuning
    want = copy.deepcopy(model)
    want.execution_order = "grouped"
    torch.testing.assert_close(model(x), want(x))


def test_forward_hooks_keep_auto_grouped_and_refuse_forced_branch_major():
    model = build_model("wrn-16-4", branches=4, num_classes=10, depths=(1, 1, 1))
    large = torch.empty(last_level_cache_bytes() // (2 * 4 * 32 * 32 * 32 * 4) + 1, 12, 32, 32)
    assert model._runs_branch_major(large)
    seen = []
    model.features[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not model._runs_branch_major(large)
    model.execution_order = "branch"
    with pytest.raises(ValueError, match=r"skip the forward hooks on \['features.0'\]"):
        model(torch.randn(2, 12, 8, 8))


def test_settings_changed_after_a_forward_are_used():
    model, x = small_model_after_one_branch_major_forward()
    model.drop_rate = 1.0  # dropout before the head now zeroes every feature: the logits are the head's bias
    torch.testing.assert_close(model(x), model.head.bias.detach().reshape(1, -1).expand(2, -1))


def test_building_the_plan_draws_no_random_numbers():
    """The first branch-major forward builds plain modules (which initialise themselves); the global random stream
    must come out as if it had not, or a resumed run would diverge from a straight one."""
    model = build_model("small_cnn", branches=2, num_classes=10).eval()
    model.execution_order = "branch"
    x = torch.randn(2, 6, 8, 8)
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(torch.get_rng_state(), state)
