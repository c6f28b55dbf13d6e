"""groupnet.complexity: pycls anchors, grouped = sum of extracted branches, plain models, no real compute."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from groupnet.complexity import CONVENTIONS, complexity
from groupnet.models import build_model
from groupnet.model_stacking import extract_branch


def test_resnet56_matches_pycls_exactly():
    """pycls dev/model_complexity.json: CIFAR R-56 (widths 16/32/64, 10 classes)."""
    c = complexity(build_model("resnet56", branches=1, num_classes=10), (3, 32, 32))
    assert (c.flops, c.params, c.acts) == (125_747_850, 855_770, 544_778)
    assert c.branches == 1 and c.per_branch == {"flops": c.flops, "params": c.params, "acts": c.acts}


def test_resnet110_matches_pycls():
    """pycls: R-110 253.1M flops, 1.731M params, 1.061M acts (rounded as published)."""
    c = complexity(build_model("resnet110", branches=1, num_classes=10), (3, 32, 32))
    assert (round(c.flops / 1e6, 1), round(c.params / 1e6, 3), round(c.acts / 1e6, 3)) == (253.1, 1.731, 1.061)


@settings(max_examples=10)
@given(
    arch=st.sampled_from(["small_cnn", "resnet20", "wrn-16-2", "resnext29-4x4d", "resnet164"]),
    branches=st.sampled_from([2, 3, 4]),
    size=st.sampled_from([8, 12]),
)
def test_grouped_model_counts_equal_the_sum_of_its_branches(arch, branches, size):
    if arch.startswith("resnext") and 4 % branches:
        branches = 2
    c_in = 1 if arch == "small_cnn" else 3
    overrides = {} if arch == "small_cnn" else {"depths": (1, 1, 1)}
    model = build_model(arch, branches=branches, num_classes=7, in_channels=c_in, **overrides)
    total = complexity(model, (c_in, size, size))
    parts = [complexity(extract_branch(model, k), (c_in, size, size)) for k in range(branches)]
    assert all(p.branches == 1 for p in parts)
    for name in ("flops", "params", "acts"):
        assert getattr(total, name) == sum(getattr(p, name) for p in parts)
        assert total.per_branch[name] == getattr(parts[0], name)


def test_plain_torch_model_follows_the_conventions():
    """Counts derived by hand from the conventions for conv (grouped, bias), BN, pool, linear."""
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, stride=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    c = complexity(model, (4, 10, 10))
    conv1_out = 8 * 5 * 5
    conv2_out = 6 * 2 * 2
    flops = conv1_out * (2 * 3 * 3 + 1) + conv2_out * 8 + 5 * (6 + 1)
    assert c.flops == flops
    assert c.acts == conv1_out + conv2_out + 5
    assert c.params == sum(p.numel() for p in model.parameters())
    assert c.branches == 1
    assert [layer.kind for layer in c.layers] == ["Conv2d", "Conv2d", "Linear"]


def test_counting_runs_no_real_compute_and_leaves_the_model_alone():
    model = build_model("resnet20", branches=2, num_classes=10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = complexity(model, (3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.device("meta"):
        meta_model = build_model("resnet20", branches=2, num_classes=10)
    m = complexity(meta_model, (3, 32, 32))
    assert (m.flops, m.params, m.acts) == (c.flops, c.params, c.acts)


def test_k_splitting_keeps_flops_and_params_and_grows_acts_by_sqrt_k():
    """CIFAR ResNet-56 with widths / sqrt(K): K branches of (w/sqrt(K))^2 keep flops and params (~1x), while
    activations, linear in width, grow by sqrt(K)."""
    base = complexity(build_model("resnet56", branches=1, num_classes=10), (3, 32, 32))
    for k in (2, 4):
        with torch.device("meta"):
            model = build_model("resnet56", branches=k, num_classes=10, divide_rule="parity")
        c = complexity(model, (3, 32, 32))
        assert abs(c.flops / base.flops - 1) < 0.02
        assert abs(c.params / base.params - 1) < 0.02
        assert abs(c.acts / base.acts / math.sqrt(k) - 1) < 0.02


def test_table_states_the_conventions():
    c = complexity(build_model("small_cnn", branches=2, num_classes=10, in_channels=1), (1, 8, 8))
    text = str(c)
    assert CONVENTIONS in text and "per branch" in text and "ensemble (K=2)" in text
    assert f"{c.flops:,}" in text
    per_layer = c.table(per_layer=True)
    assert c.layers and all(layer.name in per_layer for layer in c.layers)
    d = c.as_dict()
    assert d["flops"] == 2 * d["flops_per_branch"]


def test_bad_arguments():
    model = build_model("small_cnn", branches=2, num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="input_size"):
        complexity(model, (1, 0, 8))
    with pytest.raises(ValueError, match="branches must be a positive int"):
        complexity(model, (1, 8, 8), branches=0)
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        complexity(model, (3, 8, 8))


@pytest.mark.parametrize("arch, overrides", [("small_cnn", {}), ("resnet20", {"depths": (1, 1, 1)}),
                                             ("resnext29-4x4d", {"depths": (1, 1, 1), "widths": (16, 32, 64),
                                                                 "stem_width": 8})])
@pytest.mark.parametrize("branches", [1, 2, 4])
def test_torch_flop_counter_agrees_with_complexity_on_grouped_models(arch, overrides, branches):
    """torch's FlopCounterMode sees the grouped conv/bmm at the aten level: its FLOPs are 2 x the multiply-adds,
    without the bias adds that the pycls conventions count (module-level counters such as thop miss them)."""
    from torch.utils.flop_counter import FlopCounterMode

    c_in = 1 if arch == "small_cnn" else 3
    model = build_model(arch, branches=branches, num_classes=7, in_channels=c_in, **overrides).eval()
    size = (c_in, 8, 8)
    counted = complexity(model, size)
    biases = 0
    hooks = []

    def count_bias(m, inputs, out):
        nonlocal biases
        if getattr(m, "bias", None) is not None:
            biases += out.numel()

    for m in model.modules():
        if type(m).__name__ in ("GroupedConv2d", "GroupedLinear"):
            hooks.append(m.register_forward_hook(count_bias))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *size))
    for h in hooks:
        h.remove()
    assert counter.get_total_flops() / 2 + biases == counted.flops
