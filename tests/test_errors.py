"""Bad input raises an error that names what was expected and what came."""

import os
import subprocess
import sys

import pytest
import torch

import groupnet as gn
from groupnet import functional as GF


def test_conv_channels_not_k_times_c():
    conv = gn.GroupedConv2d(3, 4, 3, branches=2)
    with pytest.raises(ValueError, match=r"2\*3 = 6, got 5"):
        conv(torch.randn(1, 5, 8, 8))


def test_conv_wrong_rank():
    conv = gn.GroupedConv2d(3, 4, 3, branches=2)
    with pytest.raises(ValueError, match=r"4-d input, got shape \(6, 8, 8\)"):
        conv(torch.randn(6, 8, 8))


def test_linear_feature_and_k_mismatch():
    lin = gn.GroupedLinear(3, 4, branches=2)
    with pytest.raises(ValueError, match=r"2\*3 = 6, got 9"):
        lin(torch.randn(2, 9))
    with pytest.raises(ValueError, match="features"):
        GF.grouped_linear(torch.randn(2, 6), torch.randn(3, 4, 3))  # weight says K=3, input holds 2 branches


def test_dtype_and_device_mismatch():
    conv = gn.GroupedConv2d(3, 4, 3, branches=2)
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match weight dtype torch.float32"):
        conv(torch.randn(1, 6, 8, 8, dtype=torch.float64))
    lin = gn.GroupedLinear(3, 4, branches=2)
    with pytest.raises(TypeError, match="dtype"):
        lin(torch.randn(2, 6, dtype=torch.float64))
    meta = torch.randn(2, 6, device="meta")
    with pytest.raises(RuntimeError, match="input is on meta but the weights are on cpu"):
        lin(meta)
    ln = gn.GroupedLayerNorm(3, branches=2)
    with pytest.raises(TypeError, match="dtype"):
        ln(torch.randn(2, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: gn.GroupedConv2d(0, 4, 3, branches=2), "in_channels must be a positive int, got 0"),
        (lambda: gn.GroupedConv2d(3, 4, 3, branches=0), "branches must be a positive int, got 0"),
        (lambda: gn.GroupedConv2d(3, 4, 3, branches=2, groups=2), "divisible by groups"),
        (lambda: gn.GroupedConv2d(4, 4, 0, branches=2), "kernel_size must be a positive int"),
        (lambda: gn.GroupedConv2d(4, 4, 3, branches=2, padding=-1), "padding must be >= 0"),
        (lambda: gn.GroupedLinear(3, -1, branches=2), "out_features must be a positive int, got -1"),
        (lambda: gn.GroupedBatchNorm2d(4, branches=-2), "branches must be a positive int, got -2"),
        (lambda: gn.GroupedLayerNorm(0, branches=2), "num_features must be a positive int"),
    ],
)
def test_non_positive_sizes(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_norm_channel_and_rank_errors():
    bn = gn.GroupedBatchNorm2d(4, branches=3)
    with pytest.raises(ValueError, match=r"3\*4 = 12, got 8"):
        bn(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="4-d input"):
        bn(torch.randn(2, 12))
    bn1 = gn.GroupedBatchNorm1d(4, branches=3)
    with pytest.raises(ValueError, match="2 or 3-d input"):
        bn1(torch.randn(2, 12, 3, 3))
    ln = gn.GroupedLayerNorm(4, branches=3)
    with pytest.raises(ValueError, match=r"3\*4 = 12, got 10"):
        ln(torch.randn(2, 10))


def test_functional_weight_shape_errors():
    with pytest.raises(ValueError, match="not divisible by branches\\*groups = 4"):
        GF.grouped_conv2d(torch.randn(1, 8, 5, 5), torch.randn(6, 2, 3, 3), branches=4)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        GF.grouped_conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 2, 3, 3), torch.randn(4), branches=4)
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 4\)"):
        GF.grouped_linear(torch.randn(2, 6), torch.randn(2, 4, 3), torch.randn(8))


def test_backend_env_is_validated():
    """GROUPNET_BACKEND is read once, at the first op call of a process: a bad value fails that call by name."""
    code = "import torch, groupnet as gn; gn.GroupedLinear(3, 4, branches=2)(torch.randn(2, 6))"
    env = {**os.environ, "GROUPNET_BACKEND": "cuda-please"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ValueError: GROUPNET_BACKEND must be one of" in done.stderr, done.stderr


def test_use_backend_is_validated_and_restores():
    from groupnet.ops import get_backend, use_backend

    with pytest.raises(ValueError, match="use_backend: backend must be one of"):
        use_backend("cuda-please")
    before = get_backend()
    with use_backend("torch"):
        assert get_backend() == "torch"
        with use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "torch"
    assert get_backend() == before


def test_use_backend_takes_precedence_over_the_environment():
    """The environment is read once; use_backend then overrides it, and leaving the block restores it."""
    code = (
        "import os, groupnet.ops as ops\n"
        "assert ops.get_backend() == 'triton'\n"
        "os.environ['GROUPNET_BACKEND'] = 'auto'\n"
        "assert ops.get_backend() == 'triton', 'the environment must be read once'\n"
        "with ops.use_backend('torch'):\n"
        "    assert ops.get_backend() == 'torch'\n"
        "assert ops.get_backend() == 'triton'\n"
    )
    env = {**os.environ, "GROUPNET_BACKEND": "triton"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
