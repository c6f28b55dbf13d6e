"""stack_models refuses what it cannot stack exactly, naming the node, its op, its source line and why; and the
stacked model works with the library's tools (torch.compile, fusion, complexity, channels_last)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnet as gn
from archs import ARCHS, DenseNet, conv_bn
from groupnet.model_stacking import StackingError
from helpers.tolerances import assert_close

X = torch.randn(2, 3, 8, 8)


class MixesSamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        x = x.view(-1, 2)  # pairs of channels as rows: values move between rows
        return self.fc(x.repeat(1, 2))


class OwnConvWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight * 2).flatten(1)  # a weight computed in the forward


class Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.einsum("nchw->nhw", self.conv(x))


class WithModule(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.conv, self.layer = nn.Conv2d(3, 4, 1), layer

    def forward(self, x):
        return self.layer(self.conv(x)).flatten(1)


class ModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x * 2
        return x.flatten(1)


class ModeScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (self.conv(x) * (2.0 if self.training else 0.5)).flatten(1)


class SizeArithmetic(nn.Module):
    """Sizes read in the forward, keyword dims, slicing by a computed size, reshapes to another tensor's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        c = x.size(dim=1)
        y = x[:, : c // 2].transpose(dim0=2, dim1=1)
        y = y.reshape(x.shape[0], -1, 4).mean(1)
        z = x.view(x.shape).flatten(2).mean(-1)[:, :4]
        return self.fc(y) + self.fc(z)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return x.flatten(1)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DataDependent()

    def forward(self, x):
        return self.block(x)


class BatchTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x).transpose(0, 1).flatten(1)


def refusal(model_cls, *args) -> str:
    with pytest.raises(StackingError) as info:
        gn.stack_models([model_cls(*args), model_cls(*args)], example_input=X)
    return str(info.value)


def test_refusal_names_node_op_source_line_and_reason():
    msg = refusal(MixesSamples)
    assert "node 'view'" in msg and "call_method view" in msg
    assert "test_stacking_refusals.py:" in msg and "x.view(-1, 2)" in msg
    assert "dim 0 changes" in msg


@pytest.mark.parametrize("model_cls, args, match", [
    (OwnConvWeight, (), r"node 'mul' \(call_function operator.mul\).*combines per-branch parameters"),
    (Einsum, (), r"node 'einsum'.*no rule for torch.einsum"),
    (WithModule, (nn.PReLU(4),), r"no grouped counterpart for PReLU"),
    (WithModule, (nn.GroupNorm(2, 4),), r"no grouped counterpart for GroupNorm"),
    (WithModule, (nn.ChannelShuffle(2), ), None),  # rewritten, not refused
    (WithModule, (nn.Softmax2d(),), r"no rule for Softmax2d"),
    (ModeBranch, (), r"another path in eval mode"),
    (ModeScale, (), None),
    (SizeArithmetic, (), None),  # a constant set by the mode: follows the stacked model's mode
    (BatchTranspose, (), r"node 'transpose'.*moves the batch dim"),
])
def test_ops_that_cannot_be_rewritten_are_refused(model_cls, args, match):
    if match is None:
        torch.manual_seed(0)
        models = [model_cls(*args) for _ in range(2)]
        stacked = gn.stack_models(models, example_input=X)
        x = torch.randn(2, 6, 8, 8)
        for train in (True, False):
            for m in [stacked, *models]:
                m.train(train)
            torch.testing.assert_close(stacked(x), torch.cat([m(v) for m, v in zip(models, x.chunk(2, 1))], 1))
        return
    with pytest.raises(StackingError, match=match):
        gn.stack_models([model_cls(*args), model_cls(*args)], example_input=X)


def test_untraceable_forward_is_refused_naming_the_module():
    with pytest.raises(StackingError, match=r"cannot trace the forward of model\.block .*make that forward traceable"):
        gn.stack_models([Outer(), Outer()], example_input=X)


def test_models_of_different_architectures_are_refused():
    a, b = DenseNet(), DenseNet(drop=0.5)
    with pytest.raises(ValueError, match="another graph"):
        gn.stack_models([a, b])
    c = DenseNet()
    c.block1[0].conv = nn.Conv2d(6, 3, 5, padding=2, bias=False)
    with pytest.raises(ValueError, match=r"model\.block1\.0\.conv"):
        gn.stack_models([DenseNet(), c])


def test_without_example_input_the_shape_comes_from_the_first_layer():
    torch.manual_seed(0)
    models = [ARCHS["resnet_basic"]() for _ in range(2)]
    stacked = gn.stack_models(models)
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(stacked(x), torch.cat([m(v) for m, v in zip(models, x.chunk(2, 1))], 1))
    with pytest.raises(StackingError, match="pass example_input"):
        gn.stack_models([nn.Sequential(nn.ReLU()), nn.Sequential(nn.ReLU())])


@pytest.mark.parametrize("name", ["densenet", "shufflenet", "senet"])
def test_stacked_model_works_with_compile_fusion_complexity_and_channels_last(name):
    torch.manual_seed(0)
    models = [ARCHS[name]().double().eval() for _ in range(2)]
    stacked = gn.stack_models(models, example_input=X.double()).eval()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    ref = stacked(x)
    compiled = torch.compile(stacked, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), ref, kind="reference")
    assert_close(gn.fuse_for_inference(stacked)(x), ref, kind="fused")
    plain = gn.complexity(models[0], (3, 8, 8))
    stacked_count = gn.complexity(stacked, (3, 8, 8))
    assert stacked_count.branches == 2
    assert (stacked_count.flops, stacked_count.params, stacked_count.acts) == (
        2 * plain.flops, 2 * plain.params, 2 * plain.acts)
    cl = stacked.to(memory_format=torch.channels_last)
    y = cl(x.contiguous(memory_format=torch.channels_last))
    assert_close(y, ref, kind="reference")


def test_stacked_model_reads_one_shared_view_or_k_views():
    torch.manual_seed(0)
    stacked = gn.stack_models([ARCHS["inception"]().double().eval() for _ in range(3)], example_input=X.double())
    shared = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(stacked(shared), stacked(gn.repeat(shared, 3)))
    with pytest.raises(ValueError, match=r"expects \(N, 9, \.\.\.\) .* or \(N, 3, \.\.\.\)"):
        stacked(torch.randn(2, 4, 8, 8, dtype=torch.float64))
