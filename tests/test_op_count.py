"""groupnet's operator calls per forward do not grow with K (the per-branch loop's do): counted, not timed."""

import pytest
import torch

import groupnet as gn
from groupnet.fuse import fuse_for_inference
from groupnet.models import build_model
from groupnet.opcount import OperatorCalls, operator_calls

ARCHS = ("wrn-16-4", "resnet20")  # resnet20: the blocks of the benchmarked resnet56, faster to count


def forward_calls(model: torch.nn.Module, branches: int, train: bool) -> OperatorCalls:
    model.train(train)
    x = torch.randn(2, 3 * branches, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(train):
        return operator_calls(model, x)


def grouped(arch: str, branches: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, branches=branches, num_classes=10).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_grouped_forward_calls_do_not_grow_with_branches(arch, train):
    counts = {k: forward_calls(grouped(arch, k), k, train) for k in (1, 2, 4)}
    top = {k: c.top_level for k, c in counts.items()}
    assert top[1] == top[2] == top[4], top
    # Nested (dispatcher-internal) calls depend on oneDNN's per-shape choices and thread count, so only the
    # operator calls the model itself makes are compared.


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_inference_forward_calls_do_not_grow_with_branches(arch):
    counts = {}
    for k in (2, 4):
        fused = fuse_for_inference(grouped(arch, k).eval())
        counts[k] = forward_calls(fused, k, train=False)
    assert counts[2].top_level == counts[4].top_level, {k: c.top_level for k, c in counts.items()}
    plain = forward_calls(grouped(arch, 2), 2, train=False)
    assert counts[2].top_level < plain.top_level  # folding removed the batch norms' calls


def test_the_counter_sees_a_per_branch_loop_grow():
    """The counter can fail the checks above: a loop over K branch models makes about K times the calls."""
    counts = {k: forward_calls(gn.reference_of(grouped("resnet20", k)), k, train=False) for k in (2, 4)}
    assert counts[4].top_level > 1.8 * counts[2].top_level
    assert counts[4].by_name["aten::convolution"] == 2 * counts[2].by_name["aten::convolution"]
