"""torch.fx.symbolic_trace on the grouped layers and the zoo models: the traced graph computes what the module does."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

import groupnet as gn
from groupnet.modules.registry import GROUPED_LAYERS
from helpers.tolerances import assert_close

FACTORIES = {
    gn.GroupedConv2d: (lambda k: gn.GroupedConv2d(4, 6, 3, branches=k, padding=1, groups=2), (2, 4, 5, 5)),
    gn.GroupedLinear: (lambda k: gn.GroupedLinear(5, 3, branches=k), (3, 5)),
    gn.GroupedBatchNorm2d: (lambda k: gn.GroupedBatchNorm2d(4, branches=k), (3, 4, 2, 2)),
    gn.GroupedBatchNorm1d: (lambda k: gn.GroupedBatchNorm1d(4, branches=k), (3, 4)),
    gn.GroupedLayerNorm: (lambda k: gn.GroupedLayerNorm(4, branches=k), (3, 4)),
}


def test_every_registered_layer_has_a_trace_case():
    assert {e.grouped for e in GROUPED_LAYERS} == set(FACTORIES)


@pytest.mark.parametrize("cls", list(FACTORIES))
@settings(max_examples=5, deadline=None)
@given(k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_symbolic_trace_records_each_grouped_layer_as_one_call(cls, k, seed):
    torch.manual_seed(seed)
    make, shape = FACTORIES[cls]
    layer = make(k).double()
    wrapper = torch.nn.Sequential(layer, torch.nn.ReLU())
    gm = fx.symbolic_trace(wrapper)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["0", "1"]
    x = torch.randn(shape[0], k * shape[1], *shape[2:], dtype=torch.float64)
    for train in (True, False):  # the mode is the module's at run time, not the one at trace time
        wrapper.train(train)
        gm.train(train)
        assert_close(gm(x), wrapper(x), kind="reference")
    direct = fx.symbolic_trace(layer)  # the layer itself as the traced root
    assert_close(direct(x), layer(x), kind="reference")


def test_traced_grouped_layer_keeps_its_input_check():
    gm = fx.symbolic_trace(torch.nn.Sequential(gn.GroupedConv2d(3, 4, 1, branches=2)))
    with pytest.raises(ValueError, match="input channels"):
        gm(torch.randn(1, 5, 4, 4))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet20", "resnext29-8x64d"])
def test_symbolic_trace_of_a_zoo_model(arch):
    torch.manual_seed(0)
    c = 1 if arch == "small_cnn" else 3
    model = gn.build_model(arch, branches=2, num_classes=4, in_channels=c).double().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 2 * c, 8, 8, dtype=torch.float64)
    assert_close(gm(x), model(x), kind="reference")
    grouped = [n for n in gm.graph.nodes if n.op == "call_module" and gn.model_stacking.is_grouped_layer(
        gm.get_submodule(n.target))]
    assert len(grouped) == sum(1 for m in model.modules() if gn.model_stacking.is_grouped_layer(m))
