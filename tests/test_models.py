"""The model zoo: shapes, shared vs per-branch input, equality with the K extracted branches (forward and gradients,
float64), parameter parity of the division, training, channels_last, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.models import (
    ArchSpec,
    arch_spec,
    available_models,
    build_model,
    divide,
    split_drop_rate,
    split_weight_decay,
)
from groupnet.models.parity import count_params
from groupnet.modules import GroupedConv2d
from groupnet.reference import PerBranch
from groupnet.model_stacking import extract_branch

# Tiny members of every family: the arch name is divided as usual, the overrides shrink depth (and ResNeXt's widths).
TINY = {
    "small_cnn": ("small_cnn", {}, 1),
    "resnet_basic": ("resnet20", {"depths": (1, 1, 1)}, 3),
    "resnet_bottleneck": ("resnet164", {"depths": (1, 1, 1)}, 3),
    "wrn": ("wrn-16-2", {"depths": (1, 2, 1)}, 3),
    "resnext": ("resnext29-4x4d", {"depths": (1, 1, 1), "widths": (16, 32, 64), "stem_width": 8}, 3),
    "mobilenetv2": ("mobilenetv2_tiny", {"depths": (1, 2, 1, 1)}, 1),
}
NUM_CLASSES = 5


def tiny(family: str, branches: int, dtype=torch.float32):
    arch, overrides, in_channels = TINY[family]
    model = build_model(arch, branches=branches, num_classes=NUM_CLASSES, in_channels=in_channels, **overrides)
    return model.to(dtype), in_channels


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("branches", [1, 2, 4])
def test_builds_with_output_shape_and_attributes(family, branches):
    model, c = tiny(family, branches)
    assert (model.branches, model.num_classes, model.in_channels) == (branches, NUM_CLASSES, c)
    assert model(torch.randn(3, branches * c, 8, 8)).shape == (3, branches * NUM_CLASSES)
    assert model(torch.randn(3, c, 8, 8)).shape == (3, branches * NUM_CLASSES)


@pytest.mark.parametrize("arch", available_models())
@pytest.mark.parametrize("branches", [1, 2, 4])
def test_every_named_model_builds(arch, branches):
    with torch.device("meta"):
        model = build_model(arch, branches=branches, num_classes=10)
    assert model.branches == branches
    assert model(torch.empty(2, 3 * branches, 32, 32, device="meta")).shape == (2, 10 * branches)


def _param_grads_match(model, ref: PerBranch, k_total: int) -> None:
    for name, p in model.named_parameters():
        for k, branch in enumerate(ref.branch_modules):
            q = dict(branch.named_parameters())[name]
            torch.testing.assert_close(p.grad.reshape(k_total, -1)[k], q.grad.flatten(), msg=f"grad of {name}[{k}]")


@settings(max_examples=12)
@given(
    family=st.sampled_from(sorted(TINY)),
    branches=st.sampled_from([1, 2, 3, 4]),
    batch=st.integers(2, 3),
    size=st.sampled_from([6, 8]),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_model_equals_its_extracted_branches(family, branches, batch, size, shared, seed):
    """Branch k of the grouped model and extract_branch(model, k) agree: logits, input and parameter gradients
    in training mode, then logits in eval mode (running statistics updated by that step)."""
    if family == "resnext" and 4 % branches:
        branches = 2  # the SplitNet rule divides ResNeXt's cardinality (4 here) by K
    torch.manual_seed(seed)
    model, c = tiny(family, branches, torch.float64)
    ref = PerBranch([extract_branch(model, k) for k in range(branches)], shared_input=shared)
    for m in ref.branch_modules:
        assert not any(isinstance(x, GroupedConv2d) for x in m.modules())
        assert m.branches == 1
    x = torch.randn(batch, c if shared else branches * c, size, size, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = model(x1), ref(x2)
    torch.testing.assert_close(out, expected)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    _param_grads_match(model, ref, branches)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


@pytest.mark.parametrize("family", sorted(TINY))
def test_shared_input_equals_repeated_views(family):
    torch.manual_seed(0)
    model, c = tiny(family, 3 if family != "resnext" else 2, torch.float64)
    x = torch.randn(2, c, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), model(x.repeat(1, model.branches, 1, 1)))


@pytest.mark.parametrize("family", sorted(TINY))
def test_channels_last_end_to_end(family):
    torch.manual_seed(0)
    model, c = tiny(family, 2, torch.float64)
    x = torch.randn(2, 2 * c, 8, 8, dtype=torch.float64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    formats = []
    hooks = [m.register_forward_hook(lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))
             for m in model.modules() if isinstance(m, GroupedConv2d)]
    out = model(x.contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    assert formats and all(formats), "every conv output should stay channels_last"
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("family", sorted(TINY))
def test_training_steps_decrease_the_loss(family):
    torch.manual_seed(0)
    k = 2
    model, c = tiny(family, k)
    x, y = torch.randn(8, k * c, 8, 8), torch.randint(0, NUM_CLASSES, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(10):
        logits = model(x).view(8, k, NUM_CLASSES)
        loss = sum(F.cross_entropy(logits[:, b], y) for b in range(k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_small_cnn_learns_digits():
    """The default data set: K=2 small_cnn, 4 epochs on 1437 8x8 digits, tested on the other 360."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = ((x - x.mean()) / x.std()).contiguous(memory_format=torch.channels_last)
    y = torch.tensor(labels)
    perm = torch.randperm(len(x))
    train, test = perm[:1437], perm[1437:]
    k = 2
    model = build_model("small_cnn", branches=k, num_classes=10, in_channels=1).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(4):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            logits = model(x[idx]).view(len(idx), k, 10)
            loss = sum(F.cross_entropy(logits[:, b], y[idx]) for b in range(k))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x[test]).view(len(test), k, 10)
    for b in range(k):
        assert (logits[:, b].argmax(1) == y[test]).float().mean() > 0.9
    assert (logits.mean(1).argmax(1) == y[test]).float().mean() > 0.9


# ---- division rules and parameter parity -------------------------------------------------------------------------

PARITY_ARCHS = ["small_cnn", "resnet56", "resnet164", "wrn-16-8", "wrn-28-10", "resnext29-8x64d"]


@pytest.mark.parametrize("arch", PARITY_ARCHS)
@pytest.mark.parametrize("branches", [2, 4, 8])
def test_parity_rule_keeps_total_params_within_10_percent(arch, branches):
    base, _ = count_params(arch, 1)
    split, _ = count_params(arch, branches, rule="parity")
    assert abs(split / base - 1) <= 0.10, (arch, branches, split / base)


# SplitNet's own rules meet +-10% at these (arch, K); elsewhere integer widen factors / even base widths overshoot
# (ResNet and WRN-16-8 at K=2 and 8: about +13%, as the reference reports: ResNet-110 1.17M -> 1.33M, WRN-16-8
# 11.0M -> 12.4M; WRN-28-10 at K=8: k=3, -27%; ResNeXt-29 at K=8: undivided projections, +16%).
SPLITNET_PARITY = [("small_cnn", 2), ("small_cnn", 4), ("small_cnn", 8), ("resnet56", 4), ("resnet164", 4),
                   ("wrn-16-8", 4), ("wrn-28-10", 2), ("wrn-28-10", 4), ("wrn-40-10", 2), ("wrn-40-10", 4),
                   ("resnext29-8x64d", 2), ("resnext29-8x64d", 4)]


@pytest.mark.parametrize("arch, branches", SPLITNET_PARITY)
def test_splitnet_rule_keeps_total_params_within_10_percent(arch, branches):
    base, _ = count_params(arch, 1)
    split, _ = count_params(arch, branches, rule="splitnet")
    assert abs(split / base - 1) <= 0.10, (arch, branches, split / base)


def test_splitnet_rules_reproduce_the_reference_tables():
    assert [divide(arch_spec("resnet110"), k).stem_width for k in (1, 2, 4, 8, 16)] == [16, 12, 8, 6, 4]
    assert divide(arch_spec("resnet164"), 2).mid_widths == (12, 24, 48)
    assert [divide(arch_spec("wrn-28-10"), k).widths[0] // 16 for k in (1, 2, 4)] == [10, 7, 5]
    assert [divide(arch_spec("wrn-16-8"), k).widths[0] // 16 for k in (2, 4)] == [6, 4]
    assert divide(arch_spec("wrn-28-10"), 4).stem_width == 16
    rx = divide(arch_spec("resnext29-8x64d"), 2)
    assert (rx.groups, rx.mid_widths[0] // rx.groups, rx.widths) == (4, 64, (256, 512, 1024))
    assert math.isclose(split_weight_decay(5e-4, 2), 5e-4 * 0.607, rel_tol=1e-3)
    assert math.isclose(split_weight_decay(5e-4, 4), 5e-4 * 0.472, rel_tol=1e-3)
    assert split_weight_decay(5e-4, 1) == 5e-4
    wrn40 = arch_spec("wrn-40-10")
    assert divide(wrn40, 2).drop_rate == pytest.approx(wrn40.drop_rate / 2)  # resnet.py divides it by K
    assert split_drop_rate(0.2, 4) == pytest.approx(0.1)


def test_divide_false_and_overrides_give_explicit_per_branch_sizes():
    m = build_model("resnet20", branches=4, num_classes=10, divide=False)
    assert m.spec == arch_spec("resnet20")
    m = build_model("resnet20", branches=4, num_classes=10, widths=(8, 16, 24), stem_width=8)
    assert (m.spec.widths, m.spec.stem_width) == ((8, 16, 24), 8)
    assert m.head.in_features == 24


def test_k1_is_the_ordinary_network():
    m = build_model("resnet56", branches=1, num_classes=10)
    assert m.spec == arch_spec("resnet56")
    assert sum(p.numel() for p in m.parameters()) == 855_770  # pycls's CIFAR ResNet-56


def test_branches_are_initialised_independently_and_residual_gamma_zero():
    k = 4
    m = build_model("resnet20", branches=k, num_classes=10)
    block = m.features[-1][-1]
    assert torch.all(block.bn2.weight == 0) and torch.all(block.bn1.weight == 1)
    w = block.conv1.weight  # (K*32, 32, 3, 3): 9216 draws per branch
    c = w.shape[0] // k
    std_fan_out = math.sqrt(2 / (c * 9))  # kaiming fan_out of ONE branch, not of the stacked (K*c) weight
    for b in range(k):
        part = w[b * c : (b + 1) * c]
        assert abs(part.std().item() / std_fan_out - 1) < 0.05
        assert not torch.equal(part, w[((b + 1) % k) * c : ((b + 1) % k + 1) * c])
    assert m.head.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(m.head.bias == 0)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model, c = tiny("resnet_basic", 2)
    with pytest.raises(ValueError, match=r"\(N, 6, H, W\).*\(N, 3, H, W\).*got shape \(2, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got shape \(6, 8, 8\)"):
        model(torch.randn(6, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(2, 6, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown arch 'resnet-9000'"):
        build_model("resnet-9000", branches=2, num_classes=10)
    with pytest.raises(ValueError, match="depth = 6n\\+2, got 21"):
        build_model("resnet21", branches=2, num_classes=10)
    with pytest.raises(ValueError, match="depth = 6n\\+4, got 17"):
        build_model("wrn-17-4", branches=2, num_classes=10)
    with pytest.raises(TypeError, match="unknown model override.*'width'"):
        build_model("resnet20", branches=2, num_classes=10, width=3)
    with pytest.raises(ValueError, match="branches must be a positive int, got 0"):
        build_model("resnet20", branches=0, num_classes=10)
    with pytest.raises(ValueError, match="cardinality 8 by K=3"):
        build_model("resnext29-8x64d", branches=3, num_classes=10)
    with pytest.raises(ValueError, match="division rule"):
        build_model("resnet20", branches=2, num_classes=10, divide_rule="magic")
    with pytest.raises(ValueError, match="mid_widths"):
        ArchSpec(family="resnext", block="bottleneck", depths=(1,), widths=(8,), stem_width=8, strides=(1,),
                 mid_widths=(6,), groups=4)
