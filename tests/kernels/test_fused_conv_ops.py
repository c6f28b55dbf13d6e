"""The fused grouped conv ops (``grouped_conv2d_bias_act``, ``grouped_conv2d_add``, ``grouped_bn_relu_conv2d``) and
the batch norm helpers, on both backends, against the naive per-branch reference.

The reference runs each branch on its own: its slice of the input, scale, shift and residual, a plain float64
``F.conv2d`` (``groups`` inner groups) and the unfused affine map / ReLU / add. The Triton path runs on the
interpreter (tests/conftest.py), in float64, on tiny hypothesis-drawn shapes; forward and every gradient are compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.strategies import conv_cases
from helpers.tolerances import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from groupnet.ops import (
    batch_norm_scale_shift,
    fold_batch_norm,
    grouped_bn_relu_conv2d,
    grouped_conv2d_add,
    grouped_conv2d_bias_act,
    use_backend,
)

PATTERNS = ("bias_act", "add", "bn_relu", "bn_relu_add")


def per_branch_reference(case, x, w, b, scale, shift, residual, activation) -> Tensor:
    """Branch by branch: slice, pre-activate, plain conv, add, activate; concatenated on the channel axis."""
    k = case["k"]
    cin, cout = case["cin"], case["cout"]
    outs = []
    for i in range(k):
        xi = x[:, i * cin:(i + 1) * cin]
        if scale is not None:
            si, ti = scale[i * cin:(i + 1) * cin], shift[i * cin:(i + 1) * cin]
            xi = F.relu(xi * si.view(1, -1, 1, 1) + ti.view(1, -1, 1, 1))
        bi = None if b is None else b[i * cout:(i + 1) * cout]
        yi = F.conv2d(xi, w[i * cout:(i + 1) * cout], bi, case["stride"], case["padding"], case["dilation"],
                      case["groups"])
        if residual is not None:
            yi = yi + residual[:, i * cout:(i + 1) * cout]
        outs.append(F.relu(yi) if activation == "relu" else yi)
    return torch.cat(outs, 1)


def run_pattern(pattern, case, x, w, b, scale, shift, residual, activation) -> Tensor:
    conv = dict(branches=case["k"], stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"], activation=activation)
    if pattern == "bias_act":
        return grouped_conv2d_bias_act(x, w, b, **conv)
    if pattern == "add":
        return grouped_conv2d_add(x, w, b, residual, **conv)
    return grouped_bn_relu_conv2d(x, scale, shift, w, b, residual=residual, **conv)


@settings(max_examples=12)
@given(
    case=conv_cases(max_channels=8, max_batch=2, max_size=5),
    pattern=st.sampled_from(PATTERNS),
    activation=st.sampled_from([None, "relu"]),
    bias=st.booleans(),
    channels_last=st.booleans(),
    backend=st.sampled_from(["triton", "torch"]),
    seed=st.integers(0, 2**16),
)
def test_fused_ops_match_per_branch_reference(case, pattern, activation, bias, channels_last, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    g = case["k"] * case["groups"]

    def rand(*shape):
        return torch.randn(shape, dtype=torch.float64, generator=gen)

    x = rand(case["n"], g * case["cin_g"], case["h"], case["w"])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = rand(g * case["cout_g"], case["cin_g"], case["kh"], case["kw"])
    b = rand(g * case["cout_g"]) if bias else None
    pre = pattern.startswith("bn_relu")
    scale, shift = (rand(x.shape[1]), rand(x.shape[1])) if pre else (None, None)
    y_shape = F.conv2d(x, w, None, case["stride"], case["padding"], case["dilation"], g).shape
    residual = rand(*y_shape) if pattern in ("add", "bn_relu_add") else None

    leaves = [t.requires_grad_() for t in (x, w, b, scale, shift, residual) if t is not None]
    with use_backend(backend):
        y = run_pattern(pattern, case, x, w, b, scale, shift, residual, activation)
    y_ref = per_branch_reference(case, x, w, b, scale, shift, residual, activation)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, kind="reference", what=f"{pattern} forward on {backend}")
    if channels_last and backend == "triton" and not x.is_contiguous():
        # (a 1-channel or 1x1 input is both layouts at once; torch's conv keeps NCHW for it, and so do the ops)
        assert y.is_contiguous(memory_format=torch.channels_last)

    grad_y = rand(*y.shape)
    grads = torch.autograd.grad(y, leaves, grad_y)
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_y)
    for name, got, want in zip(("x", "w", "b", "scale", "shift", "residual"), grads, grads_ref):
        assert_close(got, want, kind="reference", what=f"{pattern} grad {name} on {backend}")


def test_padding_stays_zero_after_the_activation(triton_backend):
    """A zero input with a positive shift: the pre-activation is relu(shift) > 0 inside, but the padded taps must
    contribute 0 (the conv of the materialised activation pads it with zeros)."""
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    w = torch.ones(2, 1, 3, 3, dtype=torch.float64)
    scale, shift = torch.ones(2, dtype=torch.float64), torch.full((2,), 1.5, dtype=torch.float64)
    y = grouped_bn_relu_conv2d(x, scale, shift, w, branches=2, padding=1)
    counts = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]], dtype=torch.float64)  # in-bounds taps
    torch.testing.assert_close(y, (1.5 * counts).expand(1, 2, 3, 3))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_scale_shift_matches_batch_norm(training):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=gen) * 2 + 1
    bn = torch.nn.BatchNorm2d(4, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
    bn.train(training)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    scale, shift = batch_norm_scale_shift(x, mean, var, bn.weight, bn.bias, training=training, momentum=0.3,
                                          eps=bn.eps)
    y_ref = bn(x)
    assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), y_ref, kind="reference", what="scale/shift")
    assert_close(mean, bn.running_mean, kind="reference", what="running mean")
    assert_close(var, bn.running_var, kind="reference", what="running var")


def test_fold_batch_norm_matches_conv_then_bn():
    gen = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True).double()
    bn = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
        bn.weight.normal_(generator=gen)
        bn.bias.normal_(generator=gen)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
    w, b = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert_close(F.conv2d(x, w, b, padding=1, groups=2), bn(conv(x)), kind="reference", what="folded conv")


def test_fused_ops_reject_bad_operands(torch_backend):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="scale must be a floating-point \\(4,\\) tensor"):
        grouped_bn_relu_conv2d(x, torch.ones(3), torch.ones(4), w, branches=2)
    with pytest.raises(ValueError, match="residual must have the conv output's shape"):
        grouped_conv2d_add(x, w, None, torch.randn(1, 4, 5, 5), branches=2)
    with pytest.raises(TypeError, match="residual must be torch.float32"):
        grouped_conv2d_add(x, w, None, torch.randn(1, 4, 3, 3, dtype=torch.float64), branches=2)
    with pytest.raises(ValueError, match="activation must be one of"):
        grouped_conv2d_bias_act(x, w, None, branches=2, activation="gelu")


def test_opcheck_fused_forward():
    """Schema, fake tensor (shape and strides), autograd registration and aot dispatch of the fused custom op."""
    import groupnet.kernels.grouped_conv2d_fused  # noqa: F401  (registers the op)

    gen = torch.Generator().manual_seed(5)
    conv = ([2, 1], [1, 0], [1, 2])
    x = torch.randn(1, 4, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 2, 2, 2, generator=gen), torch.randn(6, generator=gen)
    scale, shift = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    r = torch.randn(1, 6, 3, 3, generator=gen)
    op = torch.ops.groupnet.grouped_conv2d_fused_forward
    torch.library.opcheck(op, (x, w, b, scale, shift, r, *conv, 2, "relu", "ieee"))
    torch.library.opcheck(op, (x.contiguous(), w, None, scale, shift, None, *conv, 2, None, "ieee"))


def test_torch_compile_fullgraph(triton_backend):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 5, generator=gen, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=gen, requires_grad=True)
    scale, shift = torch.randn(4, generator=gen), torch.randn(4, generator=gen, requires_grad=True)
    r = torch.randn(2, 6, 3, 3, generator=gen, requires_grad=True)

    def fn(x, w, shift, r):
        return grouped_bn_relu_conv2d(x, scale, shift, w, branches=2, stride=2, padding=1, residual=r,
                                      activation="relu")

    torch._dynamo.reset()
    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w, shift, r)
    with use_backend("torch"):
        y_ref = fn(x, w, shift, r)
    assert_close(y, y_ref, kind="fused", what="forward")
    grads = torch.autograd.grad(y.square().sum(), (x, w, shift, r))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, w, shift, r))
    for name, got, want in zip(("x", "w", "shift", "residual"), grads, grads_ref):
        assert_close(got, want, kind="fused", what=f"grad {name}")
