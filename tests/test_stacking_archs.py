"""stack_models on hand-written architectures: the stacked model equals the K plain models run one by one (float64,
forward, gradients, running statistics, NCHW and channels_last), every branch extracts back to its model, and the
grouped layers run once per forward whatever K."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from archs import ARCHS
from helpers.tolerances import assert_close

SHAPE = (2, 3, 8, 8)


def make_models(name: str, k: int, seed: int, train: bool) -> list[nn.Module]:
    torch.manual_seed(seed)
    models = [ARCHS[name]().double() for _ in range(k)]
    for m in models:  # non-trivial norm parameters and running statistics, different per branch
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                with torch.no_grad():
                    for t in [mod.weight, mod.bias, getattr(mod, "running_mean", None)]:
                        if t is not None:
                            t.uniform_(-0.5, 0.5)
                    if getattr(mod, "running_var", None) is not None:
                        mod.running_var.uniform_(0.5, 1.5)
        m.train(train)
    return models


def grads_as_model(stacked: nn.Module) -> nn.Module:
    """A copy of ``stacked`` whose tensors are its gradients (so extract_branch splits gradients as it splits weights)."""
    out = copy.deepcopy(stacked)
    with torch.no_grad():
        for (name, p), (_, q) in zip(stacked.named_parameters(), out.named_parameters()):
            q.copy_(p.grad)
    return out


def state_equal(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact or not sa[key].is_floating_point():
            assert torch.equal(sa[key], sb[key]), key
        else:  # running statistics after a training step: summation order differs with the memory format
            assert_close(sa[key], sb[key], kind="reference")


@pytest.mark.parametrize("name", list(ARCHS))
@settings(max_examples=6, deadline=None)
@given(k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), train=st.booleans(), channels_last=st.booleans(),
       as_graph=st.booleans())
def test_stacked_equals_the_models_one_by_one(name, k, seed, train, channels_last, as_graph):
    """Both forms: the models' own forward with grouped layers swapped in (where the graph shows it acts per
    channel) and the rewritten graph."""
    models = make_models(name, k, seed, train)
    stacked = gn.stack_models(copy.deepcopy(models), example_input=torch.randn(SHAPE, dtype=torch.float64),
                              as_graph=as_graph)
    assert gn.num_branches(stacked) == k
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stacked = stacked.to(memory_format=fmt)
    xs = [torch.randn(SHAPE, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_() for _ in range(k)]
    x = gn.stack([v.detach() for v in xs]).requires_grad_()
    y = stacked(x)
    refs = [m(v) for m, v in zip(models, xs)]
    assert_close(y, torch.cat(refs, 1), kind="reference")
    w = torch.randn_like(y)
    (y * w).sum().backward()
    sum((r * wk).sum() for r, wk in zip(refs, w.chunk(k, 1))).backward()
    assert_close(x.grad, torch.cat([v.grad for v in xs], 1), kind="reference")
    grads = grads_as_model(stacked)
    for i, m in enumerate(models):
        g = gn.extract_branch(grads, i)
        expected = dict(m.named_parameters())
        for pname, p in g.named_parameters():
            assert_close(p, expected[pname].grad, kind="reference")
        back = gn.extract_branch(stacked, i)  # running statistics updated per branch in training mode
        assert type(back) is type(m)
        state_equal(back, m, exact=False)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("as_graph", [False, True])
def test_every_branch_extracts_back_to_its_model(name, as_graph):
    models = make_models(name, 3, 0, train=False)
    stacked = gn.stack_models(models, example_input=torch.randn(SHAPE, dtype=torch.float64), as_graph=as_graph)
    x = torch.randn(SHAPE, dtype=torch.float64)
    for i, m in enumerate(models):
        back = gn.extract_branch(stacked, i)
        assert type(back) is type(m)
        assert not any(gn.model_stacking.is_grouped_layer(mod) for mod in back.modules())
        state_equal(back, m)
        assert torch.equal(back(x), m(x))
    again = gn.stack_models([gn.extract_branch(stacked, i) for i in range(3)],
                            example_input=torch.randn(SHAPE, dtype=torch.float64), as_graph=as_graph)
    state_equal(again, stacked)


@pytest.mark.parametrize("name", ["densenet", "mlp"])
def test_dropout_follows_the_stacked_models_mode(name):
    """``F.dropout(x, p, self.training)`` and ``nn.Dropout`` read the stacked model's mode, not the mode at trace time."""
    torch.manual_seed(0)
    models = [ARCHS[name](drop=0.5).double().eval() for _ in range(2)]
    stacked = gn.stack_models(models, example_input=torch.randn(SHAPE, dtype=torch.float64))
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    ref = torch.cat([m(v) for m, v in zip(models, x.chunk(2, 1))], 1)
    assert_close(stacked(x), ref, kind="reference")
    stacked.train()
    torch.manual_seed(1)
    a = stacked(x)
    torch.manual_seed(2)
    assert not torch.equal(a, stacked(x))  # dropout active in training mode
    stacked.eval()  # the training-mode calls updated the running statistics: compare with the branches now
    now = torch.cat([gn.extract_branch(stacked, i)(v) for i, v in enumerate(x.chunk(2, 1))], 1)
    assert_close(stacked(x), now, kind="reference")


@pytest.mark.parametrize("name", list(ARCHS))
def test_grouped_layers_run_once_per_forward_whatever_k(name):
    from groupnet.opcount import operator_calls

    counts = {}
    for k in (1, 2, 4):
        models = make_models(name, k, 0, train=False)
        stacked = gn.stack_models(models, example_input=torch.randn(SHAPE, dtype=torch.float64), as_graph=True)
        calls: dict[str, int] = {}
        for path, mod in stacked.named_modules():
            if gn.model_stacking.is_grouped_layer(mod):
                mod.register_forward_hook(lambda m, i, o, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
        x = torch.randn(2, 3 * k, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            counts[k] = operator_calls(stacked, x).top_level
        assert calls and set(calls.values()) == {1}
        grouped = sum(gn.model_stacking.is_grouped_layer(m) for m in stacked.modules())
        assert len(calls) == grouped >= sum(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm))
                                            for m in models[0].modules())
    assert counts[2] == counts[4], counts


def test_a_forward_that_acts_per_channel_keeps_the_models_class_and_one_that_does_not_is_rewritten():
    plain = {name: ARCHS[name]().double() for name in ("resnet_basic", "mlp", "densenet", "shufflenet")}
    stacked = {name: gn.stack_models([m, copy.deepcopy(m)], example_input=torch.randn(SHAPE, dtype=torch.float64))
               for name, m in plain.items()}
    assert type(stacked["resnet_basic"]) is type(plain["resnet_basic"])
    assert type(stacked["mlp"]) is type(plain["mlp"])
    for name in ("densenet", "shufflenet"):  # torch.cat / chunk / view along channels: the graph, rewritten
        assert isinstance(stacked[name], torch.fx.GraphModule)
