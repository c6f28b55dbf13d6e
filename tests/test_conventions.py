"""torch conventions the grouped layers follow: ``GroupedConv2d``'s ``padding="same"/"valid"`` and ``padding_mode``
against K ``nn.Conv2d``, ``GroupedLayerNorm.reset_parameters``, and the converters to and from the
``torch.func.stack_module_state`` format (torch's model-ensembling recipe), in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from groupnet.models import build_model
from helpers.tolerances import assert_close

DT = torch.float64


@st.composite
def padded_convs(draw):
    padding = draw(st.sampled_from(["same", "valid", 0, 1, 2, (1, 2)]))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    ks = draw(st.sampled_from([1, 2, 3, (3, 2), 4]))
    dilation = draw(st.sampled_from([1, 2, (1, 2)]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    k = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    # reflect needs the padding smaller than the input: inputs comfortably larger than every padding drawn
    size = (draw(st.integers(7, 9)), draw(st.integers(7, 9)))  # >= the largest dilated kernel, 7
    return dict(padding=padding, padding_mode=mode, kernel_size=ks, dilation=dilation, stride=stride,
                groups=groups, k=k, cin=cin, cout=cout, size=size, bias=draw(st.booleans()),
                channels_last=draw(st.booleans()))


@given(case=padded_convs(), seed=st.integers(0, 2**31 - 1))
def test_padding_and_padding_mode_equal_k_torch_convs(case, seed):
    torch.manual_seed(seed)
    k = case["k"]
    plain = [nn.Conv2d(case["cin"], case["cout"], case["kernel_size"], stride=case["stride"],
                       padding=case["padding"], dilation=case["dilation"], groups=case["groups"], bias=case["bias"],
                       padding_mode=case["padding_mode"], dtype=DT) for _ in range(k)]
    grouped = gn.GroupedConv2d.from_modules(plain)
    assert (grouped.padding_mode, grouped.padding) == (case["padding_mode"], plain[0].padding)
    x = torch.randn(2, k * case["cin"], *case["size"], dtype=DT)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    xg = x.detach().clone().requires_grad_()
    xs = [x[:, i * case["cin"]:(i + 1) * case["cin"]].detach().clone().requires_grad_() for i in range(k)]
    y = grouped(xg)
    expected = torch.cat([m(xi) for m, xi in zip(plain, xs)], dim=1)
    assert_close(y, expected, kind="reference")
    if case["channels_last"] and k * case["cin"] > 1:  # one channel: NCHW and channels_last are the same strides
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(expected)
    y.backward(g)
    expected.backward(g)
    assert_close(xg.grad, torch.cat([xi.grad for xi in xs], dim=1), kind="reference")
    assert_close(grouped.weight.grad, torch.cat([m.weight.grad for m in plain]), kind="reference")
    for i, m in enumerate(plain):  # branch(k) is the torch conv again, padding and mode included
        b = grouped.branch(i)
        assert (b.padding, b.padding_mode, b.stride, b.dilation) == (m.padding, m.padding_mode, m.stride, m.dilation)
        assert_close(b(xs[i].detach()), m(xs[i].detach()), kind="reference")
    assert "padding_mode" not in repr(grouped) or case["padding_mode"] != "zeros"


def test_bad_padding_is_refused_as_torch_refuses_it():
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        gn.GroupedConv2d(2, 2, 3, branches=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="'same' or 'valid'"):
        gn.GroupedConv2d(2, 2, 3, branches=2, padding="full")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        gn.GroupedConv2d(2, 2, 3, branches=2, padding_mode="mirror")


def test_layer_norm_reset_parameters_matches_torch():
    ln = gn.GroupedLayerNorm(5, branches=3, dtype=DT)
    for p in ln.parameters():
        nn.init.normal_(p)
    ln.reset_parameters()
    fresh = nn.LayerNorm(5, dtype=DT)
    for i in range(3):
        b = ln.branch(i)
        assert torch.equal(b.weight, fresh.weight) and torch.equal(b.bias, fresh.bias)
    no_affine = gn.GroupedLayerNorm(5, branches=2, elementwise_affine=False)
    no_affine.reset_parameters()  # nothing to reset, no error
    assert no_affine.weight is None


FAMILIES = {
    "small_cnn": ("small_cnn", {}),
    "resnet": ("resnet20", {"depths": (1, 1, 1)}),
    "resnext": ("resnext29-4x4d", {"depths": (1, 1, 1), "widths": (16, 32, 64), "stem_width": 8}),
}


def _model(family: str, k: int) -> nn.Module:
    arch, overrides = FAMILIES[family]
    model = build_model(arch, branches=k, num_classes=4, in_channels=3, **overrides).to(DT)
    for m in model.modules():  # non-trivial running statistics, so the buffers matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _ensemble_by_torch_func(model: nn.Module, params, buffers, x: torch.Tensor) -> torch.Tensor:
    """torch's recipe: vmap over functional_call of one plain branch skeleton; x is (K, N, C, H, W)."""
    skeleton = copy.deepcopy(gn.extract_branch(model, 0)).to("meta")

    def one(p, b, xi):
        return torch.func.functional_call(skeleton, (p, b), (xi,))

    return torch.vmap(one)(params, buffers, x)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=8)
@given(k=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**31 - 1))
def test_stacked_state_runs_torch_func_ensembling_and_loads_back(family, k, seed):
    torch.manual_seed(seed)
    model = _model(family, k)
    params, buffers = gn.to_stacked_state(model)
    expected_p, expected_b = torch.func.stack_module_state([gn.extract_branch(model, i) for i in range(k)])
    assert params.keys() == expected_p.keys() and buffers.keys() == expected_b.keys()
    assert all(torch.equal(params[n], expected_p[n]) and params[n].requires_grad for n in params)
    assert all(torch.equal(buffers[n], expected_b[n]) for n in buffers)

    views = torch.randn(k, 2, 3, 8, 8, dtype=DT)
    grouped_out = gn.unstack(model(gn.stack(list(views))), k)  # (K, N, C)
    assert_close(_ensemble_by_torch_func(model, params, buffers, views), grouped_out, kind="reference")

    # new values in the stacked format, loaded back: the grouped model computes what torch's recipe computes
    new_p = {n: v.detach() + 0.1 * torch.randn_like(v) for n, v in params.items()}
    new_b = {n: (v + 0.1 * torch.rand_like(v)) if v.is_floating_point() else v for n, v in buffers.items()}
    gn.load_stacked_state(model, new_p, new_b)
    assert_close(gn.unstack(model(gn.stack(list(views))), k), _ensemble_by_torch_func(model, new_p, new_b, views),
                 kind="reference")
    again_p, again_b = gn.to_stacked_state(model)
    assert all(torch.equal(again_p[n], new_p[n]) for n in new_p)
    assert all(torch.equal(again_b[n], new_b[n]) for n in new_b)


def test_load_stacked_state_refuses_what_does_not_fit():
    model = _model("small_cnn", 2)
    params, buffers = gn.to_stacked_state(model)
    name = next(iter(params))
    with pytest.raises(KeyError, match="missing"):
        gn.load_stacked_state(model, {n: v for n, v in params.items() if n != name}, buffers)
    with pytest.raises(KeyError, match="unexpected"):
        gn.load_stacked_state(model, {**params, "nope": params[name]}, buffers)
    with pytest.raises(ValueError, match="leading axis of K=2"):
        gn.load_stacked_state(model, {**params, name: params[name][:1]}, buffers)
    counter = next(n for n in buffers if n.endswith("num_batches_tracked"))
    with pytest.raises(ValueError, match="K slices differ"):
        gn.load_stacked_state(model, params, {**buffers, counter: torch.tensor([1, 2])})
