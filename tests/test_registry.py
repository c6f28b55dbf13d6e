"""The registry of grouped layer types is what stacking, extraction, fusion, complexity, the optimizer's parameter
groups and branch-major execution read: every entry, and nothing registered beside it, works with all of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import groupnet as gn
from groupnet.fuse import fuse_graph
from groupnet.modules import (
    GROUPED_LAYERS,
    BranchwiseLayer,
    GroupedLayerType,
    grouped_class_for,
    grouped_types,
    is_grouped_layer,
    norm_types,
)
from groupnet.training.optim import parameter_groups

K = 3

# one small configuration of each registered plain type, and the input size (C, H, W) or (F,) of one branch
PLAIN = {
    nn.Conv2d: (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
    nn.Linear: (lambda: nn.Linear(5, 3), (5,)),
    nn.BatchNorm2d: (lambda: nn.BatchNorm2d(4), (4, 5, 5)),
    nn.BatchNorm1d: (lambda: nn.BatchNorm1d(4), (4,)),
    nn.LayerNorm: (lambda: nn.LayerNorm(4), (4,)),
}
ENTRIES = {e.grouped.__name__: e for e in GROUPED_LAYERS}


def test_every_registered_plain_type_has_a_case_here():
    assert set(PLAIN) == {e.plain for e in GROUPED_LAYERS}


def plain_models(entry: GroupedLayerType, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    make, _ = PLAIN[entry.plain]
    models = [nn.Sequential(make()).double() for _ in range(K)]
    for m in models:  # non-trivial parameters and statistics
        for t in [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]:
            with torch.no_grad():
                t.uniform_(0.5, 1.5)
    return models


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_stacks_extracts_and_runs_like_k_plain_modules(name):
    entry = ENTRIES[name]
    models = [m.eval() for m in plain_models(entry)]
    stacked = gn.stack_models(models)
    assert type(stacked[0]) is entry.grouped is grouped_class_for(entry.plain)
    assert is_grouped_layer(stacked[0]) and gn.num_branches(stacked) == K
    _, size = PLAIN[entry.plain]
    xs = [torch.randn(2, *size, dtype=torch.float64) for _ in range(K)]
    torch.testing.assert_close(stacked(gn.stack(xs)), torch.cat([m(x) for m, x in zip(models, xs)], 1))
    for k, model in enumerate(models):
        out = gn.extract_branch(stacked, k)
        assert type(out[0]) is entry.plain
        assert out.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(out.state_dict()[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_parameters_are_decayed_by_kind(name):
    entry = ENTRIES[name]
    layer = gn.stack_models(plain_models(entry))[0]
    decay, no_decay = (set(map(id, g["params"])) for g in parameter_groups(layer, 0.1))
    assert (entry.grouped in norm_types()) == (entry.kind == "norm")
    for pname, p in layer.named_parameters():
        expected_no_decay = entry.kind == "norm" or pname == "bias"
        assert (id(p) in no_decay, id(p) in decay) == (expected_no_decay, not expected_no_decay), pname


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_counts_in_complexity_by_kind(name):
    entry = ENTRIES[name]
    models = plain_models(entry)
    _, size = PLAIN[entry.plain]
    counted = gn.complexity(gn.stack_models(models), size)
    if entry.kind in ("conv", "linear"):
        assert [layer.kind for layer in counted.layers] == [entry.grouped.__name__]
        assert counted.flops == K * gn.complexity(models[0], size).flops > 0
    else:
        assert counted.layers == () and counted.flops == 0


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_is_an_fx_leaf_for_fusion(name):
    entry = ENTRIES[name]
    gm = fuse_graph(gn.stack_models(plain_models(entry)).eval())
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [(n.op, n.target) for n in calls] == [("call_module", "0")]


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_runs_branch_by_branch(name):
    entry = ENTRIES[name]
    stacked = gn.stack_models(plain_models(entry)).train()
    layer = stacked[0]
    assert isinstance(layer, BranchwiseLayer)
    skeleton = layer.branch_skeleton()
    assert type(skeleton) is entry.plain and all(t.is_meta for t in skeleton.state_dict().values())
    assert [set(d) for d in layer.branch_tensors()] == [set(layer.branch(k).state_dict()) for k in range(K)]
    _, size = PLAIN[entry.plain]
    x = torch.randn(4, K * size[0], *size[1:], dtype=torch.float64)
    reference = gn.stack_models(plain_models(entry)).train()
    torch.testing.assert_close(gn.branch_major_forward(stacked, x), reference(x))
    for (n, a), b in zip(stacked.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)  # running statistics updated alike


def test_helpers_agree_with_the_table():
    assert grouped_types() == tuple(e.grouped for e in GROUPED_LAYERS)
    for kind in ("conv", "linear", "norm"):
        assert grouped_types(kind) == tuple(e.grouped for e in GROUPED_LAYERS if e.kind == kind)
    assert norm_types() == grouped_types("norm")
    with pytest.raises(ValueError, match="kind"):
        grouped_types("pool")

    class MyConv(nn.Conv2d):
        pass

    assert grouped_class_for(MyConv) is None and grouped_class_for(nn.ReLU) is None
    assert not is_grouped_layer(nn.Conv2d(2, 2, 1))


def test_an_entry_is_checked_when_it_is_written():
    with pytest.raises(ValueError, match="kind"):
        GroupedLayerType(gn.GroupedConv2d, nn.Conv2d, "convolution")

    class NotGrouped(nn.Module):
        def branch(self, k):
            return self

    with pytest.raises(TypeError, match="branch_skeleton"):
        GroupedLayerType(NotGrouped, nn.Conv2d, "conv")
