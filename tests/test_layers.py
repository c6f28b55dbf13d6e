"""Every grouped layer equals its naive per-branch reference (K plain modules in a loop), in float64.

Forward, and gradients for the input, weights and biases; NCHW and channels_last; train and eval mode.
These run the torch path (the default on CPU tensors); tests/kernels/ covers the Triton backend.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from helpers.strategies import conv_cases as conv_geometries
from helpers.tolerances import assert_close

DT = torch.float64


def compare(grouped: nn.Module, x: torch.Tensor, *, dim: int = 1, steps: int = 1) -> None:
    """Run grouped and reference side by side (``steps`` times, for running statistics) and compare everything."""
    grouped.zero_grad(set_to_none=True)
    ref = gn.reference_of(grouped, dim=dim)
    for _ in range(steps):
        xg = x.detach().clone().requires_grad_()
        xr = x.detach().clone().requires_grad_()
        yg, yr = grouped(xg), ref(xr)
        assert_close(yg, yr, kind="reference")
        g = torch.randn_like(yg)
        yg.backward(g)
        yr.backward(g)
        assert_close(xg.grad, xr.grad, kind="reference")
    k = grouped.branches
    for name, p in grouped.named_parameters():
        per_branch = [dict(m.named_parameters())[name].grad for m in ref.branch_modules]
        expected = torch.cat(per_branch) if p.dim() != len(per_branch[0].shape) + 1 else torch.stack(per_branch)
        assert p.grad is not None, name
        assert_close(p.grad.reshape(expected.shape), expected, kind="reference")
    for name, b in grouped.named_buffers():
        if name == "num_batches_tracked":
            for m in ref.branch_modules:
                assert int(dict(m.named_buffers())[name]) == int(b)
            continue
        expected = torch.cat([dict(m.named_buffers())[name] for m in ref.branch_modules])
        assert_close(b, expected, kind="reference")
    assert len(ref.branch_modules) == k


@st.composite
def conv_cases(draw):
    case = draw(conv_geometries(max_branches=6, groups=(1, 1, 2, 3), max_stride=(3, 2), max_batch=3, max_size=9,
                                padded_min_size=False))
    return dict(case, bias=draw(st.booleans()), channels_last=draw(st.booleans()))


@given(conv_cases(), st.integers(0, 2**31 - 1))
def test_grouped_conv2d_equals_reference(case, seed):
    torch.manual_seed(seed)
    conv = gn.GroupedConv2d(case["cin"], case["cout"], case["ks"], branches=case["k"], stride=case["stride"],
                            padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                            bias=case["bias"], dtype=DT)
    x = torch.randn(case["n"], case["k"] * case["cin"], case["h"], case["w"], dtype=DT)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    y = conv(x)
    if case["channels_last"]:
        assert y.is_contiguous(memory_format=torch.channels_last)
    compare(conv, x)


@given(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7), st.booleans(),
       st.sampled_from([(3,), (2, 3), ()]), st.integers(0, 2**31 - 1))
def test_grouped_linear_equals_reference(k, fin, fout, bias, lead, seed):
    torch.manual_seed(seed)
    lin = gn.GroupedLinear(fin, fout, branches=k, bias=bias, dtype=DT)
    x = torch.randn(*lead, k * fin, dtype=DT)
    assert lin(x).shape == (*lead, k * fout)
    compare(lin, x, dim=-1)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 4), st.booleans(), st.booleans(),
       st.sampled_from([0.1, None]), st.integers(0, 2**31 - 1))
def test_grouped_batchnorm2d_equals_reference(k, c, n, channels_last, affine, momentum, seed):
    torch.manual_seed(seed)
    bn = gn.GroupedBatchNorm2d(c, branches=k, affine=affine, momentum=momentum, dtype=DT)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(n, k * c, 5, 4, dtype=DT) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    compare(bn, x, steps=3)  # train mode: batch statistics, running stats updated three times
    bn.eval()
    compare(bn, x)  # eval mode: the running statistics are used


@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 4), st.sampled_from([None, 3]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_grouped_batchnorm1d_equals_reference(k, f, n, length, train, seed):
    torch.manual_seed(seed)
    bn = gn.GroupedBatchNorm1d(f, branches=k, dtype=DT)
    x = torch.randn(n, k * f, *(() if length is None else (length,)), dtype=DT)
    compare(bn, x, steps=2)
    if not train:
        bn.eval()
        compare(bn, x)


@given(st.integers(1, 6), st.integers(2, 7), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_grouped_layernorm_equals_reference(k, f, affine, bias, seed):
    torch.manual_seed(seed)
    ln = gn.GroupedLayerNorm(f, branches=k, elementwise_affine=affine, bias=bias, dtype=DT)
    if affine:
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            if ln.bias is not None:
                ln.bias.uniform_(-1, 1)
    x = torch.randn(3, 2, k * f, dtype=DT)
    compare(ln, x, dim=-1)


def test_plain_modules_act_per_branch_on_the_layout():
    """Pooling, activations, dropout (eval) and residual adds need no grouped version: they act per channel."""
    torch.manual_seed(0)
    k, c = 3, 4
    x = torch.randn(2, k * c, 8, 8, dtype=DT)
    for m in [nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Dropout2d(0.5).eval()]:
        ref = gn.PerBranch([m] * k)
        assert_close(m(x), ref(x), kind="reference")
    assert_close(x + x.flip(0), gn.stack([xk + xk.flip(0) for xk in gn.unstack(x, k)]), kind="reference")
