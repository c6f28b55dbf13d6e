"""Mixed precision: every grouped layer and zoo model runs under ``torch.autocast`` as torch's own layers do.

CPU bfloat16 autocast, forward and backward, against the float64 result of the same float32 weights and input,
within the bf16 tolerance; the output and gradient dtypes equal those of the K plain torch layers under the same
autocast (the per-branch reference). The CUDA rule of the Triton custom ops is checked through the dispatcher on CPU
tensors (the AutocastCUDA kernel is called with CUDA autocast switched on in this thread), since no GPU is needed to
see which dtype it casts to.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import groupnet as gn
from groupnet import _checks
from groupnet.models import build_model
from groupnet.ops import use_backend
from helpers.strategies import conv_cases
from helpers.tolerances import assert_close, assert_close_in_norm

BF16 = torch.bfloat16


def run(module: nn.Module, x: torch.Tensor, grad_seed: int, *, autocast: bool):
    """Output, input gradient and parameter gradients of one forward/backward (autocast on CPU in bf16 or off)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    y.backward(g)
    grads = {n: p.grad for n, p in module.named_parameters()}
    return y, x.grad, grads


def check_against_float64(module: nn.Module, x: torch.Tensor, seed: int, kind: str = "autocast") -> None:
    """The autocast run of ``module`` equals the float64 run within the bf16 tolerance; dtypes as in torch."""
    y, gx, grads = run(module, x, seed, autocast=True)
    exact = _float64_copy(module)
    y64, gx64, grads64 = run(exact, x.double(), seed, autocast=False)
    assert_close(y, y64, BF16, kind=kind, what="output")
    assert_close(gx, gx64, BF16, kind=kind, what="input gradient")
    for name, g in grads.items():
        assert g is not None and g.dtype == dict(module.named_parameters())[name].dtype, name
        assert_close(g, grads64[name], BF16, kind=kind, what=f"gradient of {name}")


def _float64_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double()


def check_dtypes_as_torch(grouped: nn.Module, x: torch.Tensor) -> None:
    """Under autocast the grouped layer's output has the dtype of its K plain torch layers' outputs."""
    ref = gn.reference_of(grouped, dim=-1 if isinstance(grouped, (gn.GroupedLinear, gn.GroupedLayerNorm)) else 1)
    with torch.autocast("cpu", dtype=BF16):
        assert grouped(x).dtype == ref(x).dtype


@st.composite
def small_conv_cases(draw):
    case = draw(conv_cases(max_branches=4, groups=(1, 2), max_stride=(2, 2), max_batch=3, max_size=7,
                           padded_min_size=False))
    return dict(case, bias=draw(st.booleans()), channels_last=draw(st.booleans()))


def check_conv(case: dict, seed: int) -> None:
    torch.manual_seed(seed)
    conv = gn.GroupedConv2d(case["cin"], case["cout"], case["ks"], branches=case["k"], stride=case["stride"],
                            padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                            bias=case["bias"])
    x = torch.randn(case["n"], case["k"] * case["cin"], case["h"], case["w"])
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    check_dtypes_as_torch(conv, x)
    check_against_float64(conv, x, seed)


@given(case=small_conv_cases(), seed=st.integers(0, 2**31 - 1))
def test_grouped_conv2d_under_bf16_autocast(case, seed):
    with use_backend("torch"):
        check_conv(case, seed)


@settings(max_examples=4)  # the Triton interpreter is slow; tests/kernels covers the kernels' geometry
@given(case=small_conv_cases(), seed=st.integers(0, 2**31 - 1))
def test_grouped_conv2d_under_bf16_autocast_triton(case, seed):
    with use_backend("triton"):
        check_conv(case, seed)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=12)
@given(k=st.integers(1, 4), fin=st.integers(1, 9), fout=st.integers(1, 9), bias=st.booleans(),
       lead=st.sampled_from([(3,), (2, 3)]), seed=st.integers(0, 2**31 - 1))
def test_grouped_linear_under_bf16_autocast(backend, k, fin, fout, bias, lead, seed):
    if backend == "triton":
        lead = lead[-1:]  # the kernel's direct entry takes (M, K*in); the op reshapes any lead for it
    torch.manual_seed(seed)
    lin = gn.GroupedLinear(fin, fout, branches=k, bias=bias)
    x = torch.randn(*lead, k * fin)
    with use_backend(backend):
        check_dtypes_as_torch(lin, x)
        check_against_float64(lin, x, seed)


@pytest.mark.parametrize("layer", ["bn2d", "bn1d", "ln", "ln_no_affine", "sync_bn2d"])
@given(k=st.integers(1, 4), c=st.integers(1, 6), train=st.booleans(), bf16_input=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_grouped_norms_under_bf16_autocast(layer, k, c, train, bf16_input, seed):
    """Norms are not cast by autocast; they take a bf16 input (the previous conv's output) as torch's norms do."""
    torch.manual_seed(seed)
    if layer == "bn2d":
        m, x = gn.GroupedBatchNorm2d(c, branches=k), torch.randn(3, k * c, 4, 4)
    elif layer == "sync_bn2d":
        m = gn.modules.convert_sync_batchnorm(gn.GroupedBatchNorm2d(c, branches=k))
        x = torch.randn(3, k * c, 4, 4)
    elif layer == "bn1d":
        m, x = gn.GroupedBatchNorm1d(c, branches=k), torch.randn(5, k * c)
    else:
        m, x = gn.GroupedLayerNorm(c, branches=k, elementwise_affine=layer == "ln"), torch.randn(3, 2, k * c)
    for p in m.parameters():
        nn.init.normal_(p)
    m.train(train)
    if bf16_input:
        x = x.to(BF16).float()  # representable in bf16: the float64 reference sees the same input
        x16 = x.to(BF16)
        ref = gn.reference_of(m, dim=-1 if layer.startswith("ln") else 1)
        with torch.autocast("cpu", dtype=BF16):
            assert m(x16).dtype == ref(x16).dtype
    check_dtypes_as_torch(m, x)
    check_against_float64(m, x, seed)


TINY_MODELS = {
    "small_cnn": ("small_cnn", {}),
    "resnet": ("resnet20", {"depths": (1, 1, 1)}),
    "resnet_bottleneck": ("resnet164", {"depths": (1, 1, 1)}),
    "wrn": ("wrn-16-2", {"depths": (1, 1, 1)}),
    "resnext": ("resnext29-4x4d", {"depths": (1, 1, 1), "widths": (16, 32, 64), "stem_width": 8}),
}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
@pytest.mark.parametrize("execution_order", ["grouped", "branch"])
@settings(max_examples=10)
@given(k=st.sampled_from([1, 2, 4]), train=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_zoo_models_under_bf16_autocast(family, execution_order, k, train, seed):
    torch.manual_seed(seed)
    arch, overrides = TINY_MODELS[family]
    model = build_model(arch, branches=k, num_classes=5, in_channels=3, **overrides).train(train)
    model.execution_order = execution_order
    x = torch.randn(8, 3 * k, 8, 8)  # batch statistics of 2 samples amplify bf16 rounding beyond the bound
    y, gx, grads = run(model, x, seed, autocast=True)
    y64, gx64, grads64 = run(_float64_copy(model), x.double(), seed, autocast=False)
    assert y.dtype == BF16 and gx.dtype == torch.float32
    assert_close_in_norm(y, y64, BF16, kind="autocast_model", what="logits")
    # Gradients through a whole network in bf16 differ from float64 by rounding as much as plain torch models' do
    # (measured: the same 5-40% in norm for the extracted plain branches); this bound catches missing, zero or
    # misrouted gradients, the layer tests above check the rounding itself.
    assert_close_in_norm(gx, gx64, BF16, kind="autocast_model_grad", what="input gradient")
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32, name
        assert_close_in_norm(g, grads64[name], BF16, kind="autocast_model_grad", what=f"gradient of {name}")


def test_cotraining_loss_of_bf16_logits_is_float32_and_differentiable():
    logits = torch.randn(6, 2 * 5, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    loss_fn = gn.CoTrainingLoss(2)
    with torch.autocast("cpu", dtype=BF16):
        out = loss_fn(logits.to(BF16), target)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    exact = loss_fn(logits.detach().to(BF16).double(), target).loss
    assert_close(out.loss.detach(), exact, torch.float32, kind="cotrain_loss")


# --- the dispatcher rule of the Triton custom ops -------------------------------------------------------------------

FORWARD_OPS = ("groupnet::grouped_conv2d_forward", "groupnet::grouped_linear_forward")
BACKWARD_OPS = ("groupnet::grouped_conv2d_backward_input", "groupnet::grouped_conv2d_backward_weight",
                "groupnet::grouped_linear_backward_input", "groupnet::grouped_linear_backward_weight")


def _load_kernels() -> None:
    import groupnet.kernels.grouped_conv2d  # noqa: F401  (registers the ops)
    import groupnet.kernels.grouped_gemm  # noqa: F401


def test_forward_custom_ops_have_cpu_and_cuda_autocast_kernels_and_backward_ops_none():
    _load_kernels()
    for name in FORWARD_OPS:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)
    for name in BACKWARD_OPS:  # backward ops take the dtypes the forward ran in
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


class _cuda_autocast_state:
    """Switch CUDA autocast on in this thread's state without a GPU (what ``torch.autocast("cuda")`` sets)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self):
        self.saved = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", self.dtype)

    def __exit__(self, *exc):
        torch.set_autocast_enabled("cuda", self.saved[0])
        torch.set_autocast_dtype("cuda", self.saved[1])


def _through_autocast_cuda(op, *args):
    """Call ``op`` entering the dispatcher at its AutocastCUDA kernel (then the CPU kernel runs the tensors)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA) | torch._C.DispatchKeySet(
        torch._C.DispatchKey.CPU)
    return op.redispatch(keys, *args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_rule_casts_forward_operands_to_the_region_dtype(dtype):
    _load_kernels()
    x, w, b = torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.randn(6)
    conv = torch.ops.groupnet.grouped_conv2d_forward.default
    args = ([1, 1], [1, 1], [1, 1], 2, None, "ieee")
    xl, wl, bl = torch.randn(3, 4), torch.randn(2, 5, 2), torch.randn(2, 5)
    linear = torch.ops.groupnet.grouped_linear_forward.default
    with _cuda_autocast_state(dtype):
        assert _checks.autocast_dtype("cuda") == dtype
        y = _through_autocast_cuda(conv, x, w, b, *args)
        z = _through_autocast_cuda(linear, xl, wl, bl, "ieee")
        y64 = _through_autocast_cuda(conv, x.double(), w.double(), b.double(), *args)  # float64: not cast
    assert (y.dtype, z.dtype, y64.dtype) == (dtype, dtype, torch.float64)
    expected = torch.nn.functional.conv2d(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(),
                                          padding=1, groups=2)
    assert_close(y, expected, dtype, reduction=2 * 9, what="conv through AutocastCUDA")
    with _cuda_autocast_state(dtype):
        torch.set_autocast_enabled("cuda", False)
        assert _through_autocast_cuda(conv, x, w, b, *args).dtype == torch.float32  # autocast off: no cast


def test_cast_policy_is_the_one_of_torch_conv_and_linear():
    """``autocast_inputs`` casts exactly what torch's autocast casts for conv2d/linear (float64 and ints stay)."""
    x32, x16, x64, idx = torch.randn(2), torch.randn(2, dtype=torch.float16), torch.randn(2, dtype=torch.float64), \
        torch.arange(2)
    assert _checks.autocast_inputs("cpu", x32, None) == (x32, None)  # autocast off: untouched
    with torch.autocast("cpu", dtype=BF16):
        out = _checks.autocast_inputs("cpu", x32, x16, x64, idx, None)
        assert [t.dtype if t is not None else None for t in out] == [BF16, BF16, torch.float64, torch.int64, None]
        assert _checks.autocast_inputs("cuda", x32)[0] is x32  # CUDA autocast is off in this region
        w = torch.randn(3, 2)
        assert torch.nn.functional.linear(x32, w).dtype == out[0].dtype  # what torch's own linear gives
