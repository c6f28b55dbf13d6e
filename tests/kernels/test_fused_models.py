"""The zoo blocks' fused forms on the Triton backend (run by the interpreter) against the same models on the torch
backend, which runs the plain module composition: logits, every parameter gradient and the running statistics.

Tiny float32 models (widths 4-8, one block per stage, 6x6 inputs) keep the interpreter fast; the tolerance is the
``"fused"`` float32 entry (relative to the largest value): the fused convs sum in another order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.compare import count_calls
from helpers.tolerances import assert_close

from groupnet.models import build_model, fused_blocks
from groupnet.ops import use_backend

TINY = dict(depths=(1, 1, 1), widths=(4, 8, 8), stem_width=4)


def tiny(arch: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, branches=2, num_classes=3, divide=False, **TINY, **extra)
    model.execution_order = "grouped"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial batch norms: affine parameters and running statistics away from 1 and 0
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
                m.running_mean.uniform_(-0.3, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def run(model, x, backend):
    with use_backend(backend):
        y = model(x)
        y.square().sum().backward()
    return y


def assert_same_model_results(fused, plain, y_fused, y_plain):
    assert_close(y_fused, y_plain, kind="fused", what="logits")
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        assert_close(p.grad, q.grad, kind="fused", what=f"grad of {name}")
    for (name, b), (_, c) in zip(fused.named_buffers(), plain.named_buffers()):
        if b.is_floating_point():
            assert_close(b, c, kind="fused", what=name)
        else:
            assert torch.equal(b, c), name


@pytest.mark.parametrize("training", [True, False])
def test_wrn_fused_blocks_match_the_module_composition(monkeypatch, training):
    plain = tiny("wrn-10-1").train(training)
    fused = copy.deepcopy(plain)
    calls = count_calls(monkeypatch, fused_blocks, "grouped_bn_relu_conv2d")
    x = torch.randn(3, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    y_plain = run(plain, x, "torch")
    assert calls[0] == 0  # the torch backend keeps the module composition
    y_fused = run(fused, x, "triton")
    assert calls[0] == 3 * 2 + 2  # two fused convs per block, and the 1x1 shortcuts of the strided stages
    assert_same_model_results(fused, plain, y_fused, y_plain)


def test_resnet_blocks_fold_at_inference(monkeypatch):
    plain = tiny("resnet20").eval()
    fused = copy.deepcopy(plain)
    calls = count_calls(monkeypatch, fused_blocks, "fold_batch_norm")
    x = torch.randn(3, 6, 6, 6, generator=torch.Generator().manual_seed(3))
    y_plain = run(plain, x, "torch")
    y_fused = run(fused, x, "triton")
    assert calls[0] == 3 * 2 + 2  # every block's two batch norms, and the projections' of the strided stages
    assert_same_model_results(fused, plain, y_fused, y_plain)


def test_resnet_training_runs_the_modules(monkeypatch):
    model = tiny("resnet20").train()
    calls = count_calls(monkeypatch, fused_blocks, "fold_batch_norm")
    with use_backend("triton"):
        model(torch.randn(2, 6, 4, 4))
    assert calls[0] == 0


def test_fuse_for_inference_runs_the_fused_kernel(monkeypatch):
    """``fuse_for_inference``'s folded convs run the fused conv ops on the Triton backend, with the same logits."""
    from groupnet import fuse

    model = tiny("resnet20").eval()
    fused = fuse.fuse_for_inference(model)
    calls = count_calls(monkeypatch, fuse, "grouped_conv2d_add")
    x = torch.randn(2, 6, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), use_backend("torch"):
        y_plain = model(x)
    with torch.no_grad(), use_backend("triton"):
        y_fused = fused(x)
    assert calls[0] == 3  # the last conv of each block adds its shortcut
    assert_close(y_fused, y_plain, kind="fused", what="logits")
