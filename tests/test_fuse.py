"""fuse_for_inference: the fused model computes what the model computes in eval mode (float64 through the torch
path, float32 through oneDNN's fused conv), for zoo models and for stacked plain models."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from groupnet.fuse import FusedConv2d, fuse_for_inference, onednn_pointwise_available
from groupnet.models import build_model
from helpers.tolerances import assert_close


def randomize_batch_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)


@settings(max_examples=12)
@given(
    arch=st.sampled_from(["resnet20", "wrn-10-1", "resnet164"]),
    branches=st.integers(1, 3),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    channels_last=st.booleans(),
    shared=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_zoo_model_matches_eval_model(arch, branches, dtype, channels_last, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(arch, branches=branches, num_classes=5).to(dtype)
    randomize_batch_norms(model, gen)
    model.eval()
    x = torch.randn(2, 3 if shared else 3 * branches, 8, 8, generator=gen, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fused = fuse_for_inference(model)
    assert any(isinstance(m, FusedConv2d) for m in fused.modules())
    with torch.no_grad():
        assert_close(fused(x), model(x), kind="fused")


@settings(max_examples=8)
@given(branches=st.integers(1, 4), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 2**31 - 1))
def test_fused_stacked_plain_models_match(branches, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def plain() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    model = gn.stack_models([plain() for _ in range(branches)]).to(dtype)
    randomize_batch_norms(model, gen)
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(3, 3 * branches, 8, 8, generator=gen, dtype=dtype)
    with torch.no_grad():
        assert_close(fused(x), model(x), kind="fused")


class SharedConvOutput(nn.Module):
    """The conv's output feeds the batch norm and the sum: folding the batch norm into it would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = gn.GroupedConv2d(3, 4, 3, branches=2, padding=1)
        self.bn = gn.GroupedBatchNorm2d(4, branches=2)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y) + y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_conv_with_two_users_is_not_folded(dtype):
    gen = torch.Generator().manual_seed(0)
    model = SharedConvOutput().to(dtype)
    randomize_batch_norms(model, gen)
    model.eval()
    fused = fuse_for_inference(model)
    x = torch.randn(2, 6, 5, 5, generator=gen, dtype=dtype)
    with torch.no_grad():
        assert_close(fused(x), model(x), kind="fused")
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_fused_model_refuses_training():
    fused = fuse_for_inference(build_model("resnet20", branches=2, num_classes=3))
    fused.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        fused(torch.randn(1, 6, 8, 8))


def test_onednn_fused_conv_is_available_on_this_build():
    """The fast path the benchmarks rely on; if a torch build lacks it, fusing still works through the torch path."""
    assert onednn_pointwise_available() == torch.backends.mkldnn.is_available()
