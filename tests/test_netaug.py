"""Network augmentation: dynamic-width grouped layers against static grouped layers holding the sliced weights
(float64, forward and gradients), the super-model's minimum slice against the tiny zoo model, sampled
configurations against their static copies and extracted branches, channel sorting, precise BN, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.model_stacking import extract_branch
from groupnet.models import build_model
from groupnet.modules import GroupedBatchNorm2d, GroupedConv2d, GroupedLinear
from groupnet.modules.dynamic import (
    DynamicGroupedBatchNorm2d,
    DynamicGroupedConv2d,
    DynamicGroupedLinear,
    to_dynamic,
)
from groupnet.netaug import check_multipliers, make_dynamic, recalibrate_batchnorm
from groupnet.reference import PerBranch
from groupnet.training.netaug_hook import augmented_loss
from helpers.tolerances import assert_close

F64 = torch.float64
# Tiny members of every family NetAug supports: (arch, overrides, input channels).
FAMILIES = {
    "small_cnn": ("small_cnn", {}, 1),
    "resnet": ("resnet20", {"depths": (1, 1, 1)}, 3),
    "wrn": ("wrn-16-2", {"depths": (1, 2, 1)}, 3),
    "mobilenetv2": ("mobilenetv2_tiny", {"depths": (1, 2, 1, 1)}, 1),
}


def _close(a, b, what: str) -> None:
    assert_close(a, b, kind="reference", what=what)


# ---------------------------------------------------------------------------------------------- layers
@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 3), cin=st.integers(1, 5), cout=st.integers(1, 5), depthwise=st.booleans(),
       data=st.data(), seed=st.integers(0, 2**16))
def test_dynamic_conv_equals_a_grouped_conv_of_its_slice(k, cin, cout, depthwise, data, seed):
    torch.manual_seed(seed)
    if depthwise:
        cout = cin
    conv = GroupedConv2d(cin, cout, 3, branches=k, padding=1, stride=data.draw(st.sampled_from([1, 2])),
                         groups=cin if depthwise else 1, bias=data.draw(st.booleans())).to(F64)
    dyn = DynamicGroupedConv2d.from_grouped(conv)
    assert dyn.weight is conv.weight  # the same parameters, not a copy
    ai = data.draw(st.integers(1, cin))
    ao = ai if depthwise else data.draw(st.integers(1, cout))
    dyn.set_active(ai, ao)
    static = dyn.static()
    x = torch.randn(2, k * ai, 5, 5, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = dyn(x1), static(x2)
    _close(y, expected, "forward")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    _close(x1.grad, x2.grad, "input grad")
    w = dyn.weight.grad.unflatten(0, (k, cout))
    cin_w = 1 if depthwise else ai
    _close(w[:, :ao, :cin_w].reshape(static.weight.shape), static.weight.grad, "weight grad")
    assert w[:, ao:].abs().sum() == 0 and w[:, :, cin_w:].abs().sum() == 0  # outside the slice: no gradient
    if conv.bias is not None:
        _close(dyn.bias.grad.view(k, cout)[:, :ao].reshape(-1), static.bias.grad, "bias grad")
    ref = PerBranch([dyn.branch(i) for i in range(k)])
    _close(ref(x), y.detach(), "extracted branches")


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 3), cin=st.integers(1, 6), cout=st.integers(1, 6), data=st.data(), seed=st.integers(0, 99))
def test_dynamic_linear_equals_a_grouped_linear_of_its_slice(k, cin, cout, data, seed):
    torch.manual_seed(seed)
    dyn = DynamicGroupedLinear.from_grouped(GroupedLinear(cin, cout, branches=k).to(F64))
    ai, ao = data.draw(st.integers(1, cin)), data.draw(st.integers(1, cout))
    dyn.set_active(ai, ao)
    static = dyn.static()
    x = torch.randn(3, k * ai, dtype=F64)
    y, expected = dyn(x), static(x)
    _close(y, expected, "forward")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    _close(dyn.weight.grad[:, :ao, :ai], static.weight.grad, "weight grad")
    _close(dyn.bias.grad[:, :ao], static.bias.grad, "bias grad")


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 3), c=st.integers(1, 6), data=st.data(), seed=st.integers(0, 99))
def test_dynamic_batchnorm_updates_the_leading_slices_only(k, c, data, seed):
    torch.manual_seed(seed)
    bn = GroupedBatchNorm2d(c, branches=k).to(F64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(1, 2)
    dyn = DynamicGroupedBatchNorm2d.from_grouped(bn)
    active = data.draw(st.integers(1, c))
    dyn.set_active(active)
    static = dyn.static()
    before_mean = dyn.running_mean.clone()
    x = torch.randn(4, k * active, 3, 3, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = dyn(x1), static(x2)
    _close(y, expected, "train forward")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    _close(x1.grad, x2.grad, "input grad")
    _close(dyn.weight.grad.view(k, c)[:, :active].reshape(-1), static.weight.grad, "gamma grad")
    mean = dyn.running_mean.view(k, c)
    _close(mean[:, :active].reshape(-1), static.running_mean, "running mean")
    assert torch.equal(mean[:, active:], before_mean.view(k, c)[:, active:])
    _close(dyn.running_var.view(k, c)[:, :active].reshape(-1), static.running_var, "running var")
    dyn.eval(), static.eval()
    _close(dyn(x), static(x), "eval forward")


def test_dynamic_layers_refuse_bad_sizes():
    conv = DynamicGroupedConv2d.from_grouped(GroupedConv2d(4, 6, 3, branches=2))
    with pytest.raises(ValueError, match=r"active out_channels must be an int in \[1, 6\]"):
        conv.set_active(4, 7)
    conv.set_active(3, 5)
    with pytest.raises(ValueError, match="active at 3 input channels"):
        conv(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="dense .groups=1. or depthwise"):
        to_dynamic(GroupedConv2d(4, 8, 3, branches=2, groups=2))
    with pytest.raises(TypeError, match="no dynamic-width version of GroupedLayerNorm"):
        from groupnet.modules import GroupedLayerNorm
        to_dynamic(GroupedLayerNorm(4, branches=2))


# ---------------------------------------------------------------------------------------------- models
def _tiny(family: str, k: int):
    arch, overrides, c = FAMILIES[family]
    return build_model(arch, branches=k, num_classes=5, in_channels=c, **overrides).to(F64), c


def _grads_close(model_a, model_b, slicer, what: str) -> None:
    for name, p in model_b.named_parameters():
        q = dict(model_a.named_parameters())[name]
        _close(slicer(name, q.grad, p.grad.shape), p.grad, f"{what}: grad of {name}")


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), k=st.integers(1, 3), shared=st.booleans(),
       seed=st.integers(0, 2**16))
def test_minimum_slice_equals_the_tiny_grouped_model_holding_the_same_weights(family, k, shared, seed):
    torch.manual_seed(seed)
    tiny, c = _tiny(family, k)
    big, space = make_dynamic(tiny)
    assert space.config == space.min_config()
    tiny.load_state_dict(space.freeze().state_dict())  # the same structure and keys, at the tiny widths
    x = torch.randn(3, c if shared else k * c, 6, 6, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = big(x1), tiny(x2)
    _close(y, expected, "forward")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    _close(x1.grad, x2.grad, "input grad")
    big_modules = dict(big.named_modules())

    def leading(name: str, grad, shape):
        layer = big_modules[name.rsplit(".", 1)[0]]
        k_, rows = layer.branches, grad.shape[0] // layer.branches
        if isinstance(layer, DynamicGroupedLinear):  # (K, out, in) weight, (K, out) bias
            return grad[:, : shape[1], : shape[2]] if grad.dim() == 3 else grad[:, : shape[1]]
        per_branch = grad.unflatten(0, (k_, rows))[:, : shape[0] // k_]
        if grad.dim() > 1:
            per_branch = per_branch[:, :, : shape[1]]
        return per_branch.reshape(shape)

    _grads_close(big, tiny, leading, "min slice")
    big.eval(), tiny.eval()
    with torch.no_grad():
        _close(big(x), tiny(x), "eval forward")


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_a_sampled_configuration_equals_its_static_model_and_extracted_branches(family, k, seed):
    torch.manual_seed(seed)
    tiny, c = _tiny(family, k)
    big, space = make_dynamic(tiny)
    config = space.sample(torch.Generator().manual_seed(seed))
    space.set(config)
    frozen = space.freeze()
    x = torch.randn(2, k * c, 6, 6, dtype=F64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = big(x1), frozen(x2)
    _close(y, expected, "forward")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (expected * g).sum().backward()
    _close(x1.grad, x2.grad, "input grad")
    big.eval()
    ref = PerBranch([extract_branch(big, i) for i in range(k)])
    for m in ref.branch_modules:
        assert not any(isinstance(x, (DynamicGroupedConv2d, GroupedConv2d)) for x in m.modules())
    with torch.no_grad():
        _close(ref(x), big(x), "extracted branches")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_largest_configuration_is_the_allocated_model(family):
    torch.manual_seed(0)
    tiny, _ = _tiny(family, 2)
    big, space = make_dynamic(tiny)
    space.set_max()
    layers = [m for m in big.modules() if isinstance(m, (DynamicGroupedConv2d, DynamicGroupedBatchNorm2d))]
    assert all(m.is_full for m in layers)
    space.set_min()
    assert sum(p.numel() for p in space.freeze().parameters()) == sum(p.numel() for p in tiny.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sorting_channels_keeps_the_tiny_and_the_full_model(family):
    torch.manual_seed(1)
    tiny, c = _tiny(family, 2)
    big, space = make_dynamic(tiny)
    optimizer = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 2 * c, 6, 6, dtype=F64)
    big(x).square().sum().backward()
    optimizer.step()  # momentum buffers exist
    big.eval()
    with torch.no_grad():
        before = {}
        for name, config in (("min", space.min_config()), ("max", space.max_config())):
            space.set(config)
            before[name] = big(x)
        momentum = {p: optimizer.state[p]["momentum_buffer"].clone() for p in big.parameters()}
        weights = {p: p.detach().clone() for p in big.parameters()}
        assert space.sort_channels(optimizer) == len(space.sortable())
        for name, config in (("min", space.min_config()), ("max", space.max_config())):
            space.set(config)
            _close(big(x), before[name], f"{name} model after sorting")
    moved = [p for p in big.parameters() if not torch.equal(p, weights[p])]
    assert bool(moved) == bool(space.sortable())  # small_cnn has no inner channels to sort
    for p in moved:  # the momentum moved with its weight: same multiset of (weight, momentum) pairs per tensor
        pairs_before = torch.stack([weights[p].flatten(), momentum[p].flatten()], 1)
        pairs_after = torch.stack([p.detach().flatten(), optimizer.state[p]["momentum_buffer"].flatten()], 1)
        assert torch.equal(pairs_before[pairs_before[:, 0].argsort()], pairs_after[pairs_after[:, 0].argsort()])
    for choice in space.sortable():  # the extra channels are in descending importance, per branch
        lo = space.widths(space.min_config())[choice.name]
        hi = space.widths(space.max_config())[choice.name]
        w = choice.consumers[0].weight.detach().unflatten(0, (2, -1))[:, :, lo:hi].abs().sum((1, 3, 4))
        assert torch.all(w[:, :-1] >= w[:, 1:])


def test_precise_bn_is_the_exact_mean_over_the_batches():
    torch.manual_seed(0)
    bn = GroupedBatchNorm2d(3, branches=2, momentum=0.3).to(F64)
    batches = [torch.randn(5, 6, 2, 2, dtype=F64) for _ in range(3)]
    bn.eval()
    assert recalibrate_batchnorm(bn, batches) == 15
    assert not bn.training and bn.momentum == 0.3
    means = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in batches]).mean(0)
    _close(bn.running_mean, means, "running mean")
    _close(bn.running_var, variances, "running var")


def test_augmented_loss_sums_the_branches_cross_entropies():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3 * 4, dtype=F64), torch.randint(0, 4, (6,))
    expected = sum(F.cross_entropy(logits[:, 4 * i : 4 * (i + 1)], target) for i in range(3))
    _close(augmented_loss(logits, target, 3), expected, "hard targets")
    soft = torch.softmax(torch.randn(6, 4, dtype=F64), 1)
    expected = sum(F.cross_entropy(logits[:, 4 * i : 4 * (i + 1)], soft) for i in range(3))
    _close(augmented_loss(logits, soft, 3), expected, "soft targets")


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mults, match", [
    ((0.5, 1.0), "numbers >= 1"),
    ((1.5, 2.0), "must contain 1"),
    ((), "at least one"),
    ((1.0, float("nan")), "numbers >= 1"),
])
def test_bad_multipliers_are_refused(mults, match):
    with pytest.raises(ValueError, match=match):
        check_multipliers("width multipliers", mults)


@pytest.mark.parametrize("arch, overrides", [("resnet164", {"depths": (1, 1, 1)}),
                                             ("resnext29-4x4d", {"depths": (1, 1, 1)})])
def test_an_architecture_without_dynamic_support_is_refused(arch, overrides):
    model = build_model(arch, branches=1, num_classes=5, **overrides)
    with pytest.raises(ValueError, match="no dynamic-width support for family"):
        make_dynamic(model)
