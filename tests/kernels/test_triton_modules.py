"""Grouped modules running on the Triton kernels (interpreter, ``use_backend("triton")``) against their per-branch
reference modules (``groupnet.reference_of``: K plain ``nn.Conv2d`` / ``nn.Linear`` run in a loop, in float64)."""

from __future__ import annotations

import torch
from helpers.compare import assert_branch_param_grads, backward_with_reference, count_calls
from helpers.tolerances import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import groupnet.kernels.grouped_conv2d as triton_conv
import groupnet.kernels.grouped_gemm as triton_gemm
from groupnet import GroupedConv2d, GroupedLinear, reference_of

# The backend fixture patches the environment once per test, which is what every example needs.
module_settings = settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])


@module_settings
@given(
    k=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    bias=st.booleans(),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    size=st.tuples(st.integers(1, 2), st.integers(3, 6), st.integers(3, 6)),
    seed=st.integers(0, 2**16),
)
def test_grouped_conv2d_module_matches_reference(
    triton_backend, monkeypatch, k, groups, in_per_group, out_per_group, kernel, stride, padding, bias,
    channels_last, dtype, size, seed,
):  # fmt: skip
    torch.manual_seed(seed)
    in_c, out_c = groups * in_per_group, groups * out_per_group
    conv = GroupedConv2d(
        in_c, out_c, kernel, branches=k, stride=stride, padding=padding, groups=groups, bias=bias, dtype=dtype
    )
    ref = reference_of(conv).double()
    n, h, w = size
    x = torch.randn(n, k * in_c, h, w, dtype=dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    calls = count_calls(monkeypatch, triton_conv, "run_grouped_conv2d")
    y, y_ref, x_ref = backward_with_reference(conv, ref, x)

    assert calls[0] == 1, "the module did not run the Triton conv"
    taps = kernel * kernel
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    assert_close(y, y_ref, dtype, reduction=in_per_group * taps, what="forward")
    assert_close(x.grad, x_ref.grad, dtype, reduction=out_per_group * taps, what="grad input")
    assert_branch_param_grads(conv, ref, torch.cat, dtype, reduction=pixels, bias=bias)


@module_settings
@given(
    k=st.integers(1, 4),
    in_f=st.integers(1, 20),
    out_f=st.integers(1, 20),
    lead=st.sampled_from([(5,), (2, 3), (1,)]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_grouped_linear_module_matches_reference(triton_backend, monkeypatch, k, in_f, out_f, lead, bias, dtype, seed):
    torch.manual_seed(seed)
    lin = GroupedLinear(in_f, out_f, branches=k, bias=bias, dtype=dtype)
    ref = reference_of(lin, dim=-1).double()
    x = torch.randn(*lead, k * in_f, dtype=dtype, requires_grad=True)
    calls = count_calls(monkeypatch, triton_gemm, "run_grouped_linear")
    y, y_ref, x_ref = backward_with_reference(lin, ref, x)

    assert calls[0] == 1, "the module did not run the Triton grouped GEMM"
    rows = x.numel() // x.shape[-1]
    assert_close(y, y_ref, dtype, reduction=in_f, what="forward")
    assert_close(x.grad, x_ref.grad, dtype, reduction=out_f, what="grad input")
    assert_branch_param_grads(lin, ref, torch.stack, dtype, reduction=rows, bias=bias)


def test_channels_last_is_preferred_exactly_where_the_triton_convs_run_on_cuda():
    """The trainer's channels_last default and the zoo models' input conversion: on where the grouped convs run the
    Triton kernels on CUDA (their NCHW loads are gathers), never on the CPU (torch, or the interpreter)."""
    from groupnet.ops import prefers_channels_last, triton_available, use_backend

    for backend, on_cuda in (("triton", True), ("torch", False), ("auto", triton_available())):
        with use_backend(backend):
            assert prefers_channels_last("cuda") is on_cuda
            assert prefers_channels_last(torch.device("cuda", 1)) is on_cuda
            assert prefers_channels_last(torch.device("cpu")) is False


def test_zoo_models_leave_cpu_inputs_in_their_layout(triton_backend):
    """The conversion at the model boundary is for CUDA only: on the CPU an NCHW input reaches the first conv as
    NCHW (the output matches the torch backend's)."""
    from groupnet.models import build_model
    from groupnet.ops import use_backend

    model = build_model("small_cnn", branches=2, num_classes=3, in_channels=1, image_size=8).double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    seen = []
    handle = model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    got = model(x)
    handle.remove()
    with use_backend("torch"):
        want = model(x)
    assert seen == [True]
    assert_close(got, want, torch.float64, reduction=64, what="logits")
