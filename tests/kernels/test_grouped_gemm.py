"""The Triton grouped GEMM (kernels/grouped_gemm.py) under the interpreter, against float64 per-branch references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.compare import count_calls, float64_leaves
from helpers.oob import assert_no_oob, nan_embedded, sentinel_output
from helpers.tolerances import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.kernels import grouped_gemm as gg
from groupnet.kernels._common import SHARED_MEMORY_LIMIT

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: loads/stores only, math in fp32 (interpreter)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Naive per-branch loop in float64: branch k maps columns [k*in, (k+1)*in) with weight[k]."""
    k, _, in_f = weight.shape
    x, weight = x.double(), weight.double()
    outs = [x[:, i * in_f : (i + 1) * in_f] @ weight[i].T for i in range(k)]
    if bias is not None:
        outs = [o + bias[i].double() for i, o in enumerate(outs)]
    return torch.cat(outs, dim=1)


@st.composite
def problems(draw, max_size: int = 70):
    k = draw(st.integers(1, 6))
    m = draw(st.integers(1, max_size))
    in_f = draw(st.integers(1, max_size))
    out_f = draw(st.integers(1, max_size))
    return k, m, in_f, out_f


def _random(shape, dtype, gen, scale=1.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)


@settings(max_examples=20)
@given(
    problem=problems(),
    has_bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    x_layout=st.sampled_from(["contiguous", "column_slice", "transposed"]),
    input_precision=st.sampled_from(gg.INPUT_PRECISIONS),
    seed=st.integers(0, 2**31 - 1),
)
def test_grouped_linear_matches_per_branch_reference(problem, has_bias, dtype, x_layout, input_precision, seed):
    """Forward, dX, dW and db of the public op (autograd through the custom ops) against float64 autograd."""
    k, m, in_f, out_f = problem
    gen = torch.Generator().manual_seed(seed)
    x = _random((m, k * in_f), dtype, gen)
    if x_layout != "contiguous":
        x = nan_embedded(x, transpose=x_layout == "transposed")
    weight = _random((k, out_f, in_f), dtype, gen)
    bias = _random((k, out_f), dtype, gen) if has_bias else None
    grad_y = _random((m, k * out_f), dtype, gen)

    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if has_bias else ())]
    y = gg.grouped_linear(*leaves[:2], leaves[2] if has_bias else None, input_precision=input_precision)
    y.backward(grad_y)
    ref_leaves = float64_leaves(*leaves)
    y_ref = reference_linear(*ref_leaves[:2], ref_leaves[2] if has_bias else None)
    y_ref.backward(grad_y.double())

    assert y.dtype == dtype and y.shape == (m, k * out_f) and y.is_contiguous()
    assert_close(y, y_ref, dtype, reduction=in_f, what="forward")
    assert_close(leaves[0].grad, ref_leaves[0].grad, dtype, reduction=out_f, what="grad x")
    assert_close(leaves[1].grad, ref_leaves[1].grad, dtype, reduction=m, what="grad weight")
    if has_bias:
        assert_close(leaves[2].grad, ref_leaves[2].grad, dtype, reduction=m, what="grad bias")


@settings(max_examples=12)
@given(
    problem=problems(max_size=40),
    has_bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_launches_stay_in_bounds(problem, has_bias, dtype, transpose, seed):
    """All three launches read only inside NaN-padded inputs and write exactly their sentinel-padded outputs."""
    k, m, in_f, out_f = problem
    gen = torch.Generator().manual_seed(seed)
    x = nan_embedded(_random((m, k * in_f), dtype, gen), transpose=transpose)
    weight = nan_embedded(_random((k, out_f, in_f), dtype, gen), transpose=transpose)
    bias = nan_embedded(_random((k, out_f), dtype, gen)) if has_bias else None
    grad_y = nan_embedded(_random((m, k * out_f), dtype, gen), transpose=not transpose)

    y = sentinel_output((m, k * out_f), dtype, transpose=transpose)
    gg.forward_into(x, weight, bias, out=y.view)
    assert_no_oob(y, "forward")
    assert_close(y.view, reference_linear(x, weight, bias), dtype, reduction=in_f, what="forward")

    grad_x = sentinel_output((m, k * in_f), dtype, transpose=not transpose)
    gg.backward_input_into(grad_y, weight, out=grad_x.view)
    assert_no_oob(grad_x, "backward input")
    ref_grad_x = torch.cat(
        [grad_y[:, i * out_f : (i + 1) * out_f].double() @ weight[i].double() for i in range(k)], dim=1
    )
    assert_close(grad_x.view, ref_grad_x, dtype, reduction=out_f, what="backward input")

    grad_w = sentinel_output((k, out_f, in_f), dtype, transpose=transpose)
    gg.backward_weight_into(grad_y, x, out=grad_w.view)
    assert_no_oob(grad_w, "backward weight")
    ref_grad_w = torch.stack(
        [
            grad_y[:, i * out_f : (i + 1) * out_f].double().T @ x[:, i * in_f : (i + 1) * in_f].double()
            for i in range(k)
        ]
    )
    assert_close(grad_w.view, ref_grad_w, dtype, reduction=m, what="backward weight")


def test_stride_zero_grad_from_sum():
    """``y.sum().backward()`` hands the backward an expanded (all-zero-stride) gradient."""
    gen = torch.Generator().manual_seed(0)
    k, m, in_f, out_f = 3, 9, 17, 5
    x = _random((m, k * in_f), torch.float32, gen).requires_grad_()
    weight = _random((k, out_f, in_f), torch.float32, gen).requires_grad_()
    bias = _random((k, out_f), torch.float32, gen).requires_grad_()
    gg.grouped_linear(x, weight, bias).sum().backward()
    refs = float64_leaves(x, weight, bias)
    reference_linear(*refs).sum().backward()
    for got, ref, what in zip((x, weight, bias), refs, ("x", "weight", "bias")):
        assert_close(got.grad, ref.grad, torch.float32, reduction=m, what=f"grad {what}")


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    k, m, in_f, out_f = 2, 2, 3, 2
    inputs = [
        _random(shape, torch.float64, gen).requires_grad_() for shape in ((m, k * in_f), (k, out_f, in_f), (k, out_f))
    ]
    assert torch.autograd.gradcheck(gg.grouped_linear, inputs)


def test_opcheck_custom_ops():
    gen = torch.Generator().manual_seed(2)
    k, m, in_f, out_f = 2, 5, 6, 3
    x = _random((m, k * in_f), torch.float32, gen)
    weight = _random((k, out_f, in_f), torch.float32, gen)
    bias = _random((k, out_f), torch.float32, gen)
    grad_y = _random((m, k * out_f), torch.float32, gen)
    ops = torch.ops.groupnet
    torch.library.opcheck(ops.grouped_linear_forward, (x, weight, bias, "ieee"))
    torch.library.opcheck(ops.grouped_linear_forward, (x, weight, None, "ieee"))
    torch.library.opcheck(ops.grouped_linear_backward_input, (grad_y, weight, "ieee"))
    torch.library.opcheck(ops.grouped_linear_backward_weight, (grad_y, x, k, "ieee"))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    k, m, in_f, out_f = 2, 6, 7, 5
    inputs = [_random(s, torch.float32, gen) for s in ((m, k * in_f), (k, out_f, in_f), (k, out_f))]
    leaves = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(gg.grouped_linear, backend=backend, fullgraph=True)
    (compiled(*leaves) * 2).sum().backward()
    refs = float64_leaves(*inputs)
    (reference_linear(*refs) * 2).sum().backward()
    for got, ref in zip(leaves, refs):
        assert_close(got.grad, ref.grad, torch.float32, reduction=m, what=f"{backend} grad")


def test_functional_dispatches_to_the_kernel(triton_backend, monkeypatch):
    """groupnet.functional.grouped_linear on the Triton backend runs the kernel, also on (..., K*in)."""
    from groupnet import functional

    calls = count_calls(monkeypatch, gg, "launch_grouped_gemm")
    gen = torch.Generator().manual_seed(4)
    k, in_f, out_f = 3, 4, 6
    x = _random((2, 5, k * in_f), torch.float32, gen)
    weight = _random((k, out_f, in_f), torch.float32, gen)
    bias = _random((k, out_f), torch.float32, gen)
    y = functional.grouped_linear(x, weight, bias)
    assert calls[0], "the Triton backend did not reach the Triton launcher"
    assert y.shape == (2, 5, k * out_f)
    assert_close(y.reshape(10, -1), reference_linear(x.reshape(10, -1), weight, bias), torch.float32, reduction=in_f)


def _bad(**overrides):
    args = dict(x=torch.zeros(4, 6), weight=torch.zeros(2, 5, 3), bias=torch.zeros(2, 5))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(x=torch.zeros(4, 8)), ValueError, "features = branches*features_per_branch = 2*3 = 6, got 8"),
        (dict(x=torch.zeros(2, 4, 6)), ValueError, "expects a 2-d input, got shape (2, 4, 6)"),
        (dict(weight=torch.zeros(10, 3)), ValueError, "weight must be (K, out, in), got shape (10, 3)"),
        (dict(bias=torch.zeros(5)), ValueError, "bias must have shape (2, 5), got (5,)"),
        (dict(x=torch.zeros(4, 6, dtype=torch.float16)), TypeError, "input dtype torch.float16 does not match"),
        (dict(bias=torch.zeros(2, 5, dtype=torch.float16)), TypeError, "bias dtype torch.float16 does not match"),
        (dict(bias=torch.zeros(2, 5, device="meta")), RuntimeError, "bias is on meta but the weights are on cpu"),
        (dict(x=torch.zeros(4, 6, device="meta")), RuntimeError, "input is on meta but the weights are on cpu"),
        (
            dict(x=torch.zeros(4, 6, dtype=torch.int32), weight=torch.zeros(2, 5, 3, dtype=torch.int32), bias=None),
            TypeError,
            "supports dtypes",
        ),
    ],
)
def test_bad_input_errors(overrides, error, message):
    args = _bad(**overrides)
    with pytest.raises(error) as info:
        gg.grouped_linear(args["x"], args["weight"], args["bias"])
    assert message in str(info.value)


def test_bad_precision_and_device_without_interpreter(monkeypatch):
    args = _bad()
    with pytest.raises(ValueError, match="input_precision must be one of"):
        gg.grouped_linear(args["x"], args["weight"], args["bias"], input_precision="fp8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors .* got a tensor on cpu"):
        gg.grouped_linear(args["x"], args["weight"], args["bias"])


def test_launcher_rejects_mismatched_operands_and_huge_strides():
    a, b, out = torch.zeros(2, 3, 4), torch.zeros(2, 4, 5), torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"expected a \(G, M, KD\), b \(G, KD, N\)"):
        gg.launch_grouped_gemm(a, torch.zeros(2, 3, 5), out)
    with pytest.raises(TypeError, match="out has dtype torch.float64, expected torch.float32"):
        gg.launch_grouped_gemm(a, b, out.double())
    storage = torch.zeros(2**24 + 8, dtype=torch.float16)
    wide = storage.as_strided((1, 2, 4), (0, 2**24, 1))  # a row stride whose tile offsets overflow int32
    with pytest.raises(ValueError, match="offsets inside a tile are int32"):
        gg.launch_grouped_gemm(wide, torch.zeros(1, 4, 3, dtype=wide.dtype), torch.zeros(1, 2, 3, dtype=wide.dtype))


def test_every_gpu_config_is_dot_legal():
    """Every config fits a 16-bit tl.dot, the int32 tile offsets and sm_80's shared memory (which configs the
    compile check builds: tests/kernels/test_compile_specs.py)."""
    for cfg in gg.GPU_CONFIGS + [gg.INTERPRETER_CONFIG]:
        kw = cfg.kwargs
        assert kw["BLOCK_K"] >= 16, f"BLOCK_K < 16 cannot feed 16-bit tl.dot on a GPU: {cfg}"
        assert max(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]) <= gg.MAX_BLOCK
        fp32_operand_bytes = cfg.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4
        assert fp32_operand_bytes <= SHARED_MEMORY_LIMIT[80], f"{cfg} cannot hold its fp32 stages on sm_80"


def test_autotune_keys_exclude_the_batch():
    """The batch size is M in forward/dX and KD in dW: neither may be an autotune key (no retune per batch)."""
    assert "M" not in gg._features_reduced_gemm.keys
    assert "KD" not in gg._batch_reduced_gemm.keys


def test_default_precision_follows_the_new_and_the_legacy_tf32_settings():
    """torch's fp32_precision attributes and its legacy allow_tf32 flags both decide the default, and setting the new
    ones does not make the kernels read the legacy flags (torch raises on that mix). In a fresh process: the
    settings are global."""
    code = (
        "import torch\n"
        "from groupnet.kernels._common import default_input_precision as p\n"
        "assert (p('matmul'), p('conv')) == ('ieee', 'tf32'), (p('matmul'), p('conv'))\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "assert p('matmul') == 'tf32'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'\n"
        "assert (p('matmul'), p('conv')) == ('ieee', 'ieee'), (p('matmul'), p('conv'))\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "assert p('matmul') == 'tf32'\n"
        "from groupnet.kernels.grouped_gemm import grouped_linear\n"
        "from groupnet.kernels.grouped_conv2d import grouped_conv2d\n"
        "grouped_linear(torch.randn(3, 4), torch.randn(2, 5, 2))\n"
        "grouped_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3), branches=2)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_autotune_keys_cover_what_changes_the_best_config():
    """Keys: the non-batch sizes, the group count, the dot precision (and, added by triton's autotuner, the operand
    dtypes); the TMA tuners also the operand layouts. Timings are cached across processes (cache_results)."""
    tuners = (gg._features_reduced_gemm, gg._batch_reduced_gemm, gg._features_reduced_tma, gg._batch_reduced_tma)
    for tuner in tuners:
        assert {"N", "G", "INPUT_PRECISION"} <= set(tuner.keys)
        assert tuner.fn.arg_names.index("G") >= 0
    for tuner in tuners[2:]:
        assert {"A_K_CONTIGUOUS", "B_N_CONTIGUOUS"} <= set(tuner.keys)
    assert "M" not in gg._features_reduced_tma.keys and "KD" not in gg._batch_reduced_tma.keys


def test_pinned_configs_depend_on_the_shape_only(monkeypatch):
    """With configs pinned, the choice is a function of dtype, precision, output size and kernel: every call gives
    the same config object, one from the list that pass may use (so it is a legal, compiled config)."""
    from groupnet.kernels import grouped_gemm_tma as tma

    monkeypatch.setattr(gg, "is_interpreter", lambda: False)
    for dtype, name, precision in (
        (torch.bfloat16, "bf16", "ieee"), (torch.float32, "fp32", "tf32"), (torch.float32, "fp32", "ieee")
    ):
        for m, n in ((8, 8), (64, 300), (300, 64), (4096, 4096)):
            cfg = gg.pinned_config(dtype, precision, m, n)
            assert cfg is gg.pinned_config(dtype, precision, m, n)
            assert any(cfg is c for c in gg.gpu_configs(name, precision))
            if name != "fp32" or precision == "tf32":
                tma_cfg = gg.pinned_config(dtype, precision, m, n, tma=True)
                assert any(tma_cfg is c for c in tma.tma_configs(name))
    assert gg.pinned_config(torch.bfloat16, "ieee", 4096, 4096).kwargs["BLOCK_M"] == 128


def test_deterministic_algorithms_pin_the_config(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the launcher passes a pinned config instead of autotuning."""
    seen = []
    monkeypatch.setattr(gg, "launch", lambda kernel, grid, args, constexprs, config: seen.append(config))
    a, b, out = torch.zeros(2, 3, 4), torch.zeros(2, 4, 5), torch.zeros(2, 3, 5)
    gg.launch_grouped_gemm(a, b, out)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gg.launch_grouped_gemm(a, b, out)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [None, gg.pinned_config(torch.float32, "ieee", 3, 5)]


@st.composite
def tma_problems(draw):
    """Feature counts that are multiples of 8: every group stride and row stride is a multiple of 16 bytes."""
    k = draw(st.integers(1, 3))
    m = draw(st.integers(1, 40))
    return k, m, 8 * draw(st.integers(1, 5)), 8 * draw(st.integers(1, 5))


@settings(max_examples=6)
@given(problem=tma_problems(), has_bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_tma_kernel_matches_per_branch_reference(problem, has_bias, dtype, seed):
    """The TMA kernel (descriptor loads, zero fill past the edges) on all three passes of the linear layer, against
    float64 references; the interpreter checks TMA's alignment rules on every descriptor and load."""
    from groupnet.kernels import grouped_gemm_tma as tma

    k, m, in_f, out_f = problem
    gen = torch.Generator().manual_seed(seed)
    x = _random((m, k * in_f), dtype, gen)
    weight = _random((k, out_f, in_f), dtype, gen)
    bias = _random((k, out_f), dtype, gen) if has_bias else None
    grad_y = _random((m, k * out_f), dtype, gen)

    y = torch.full((m, k * out_f), float("nan"), dtype=dtype)
    a, b = gg._groups(x, k), weight.transpose(1, 2)
    assert tma.tma_layouts(a, b) == (True, False)
    gg.launch_grouped_gemm(a, b, gg._groups(y, k), bias=bias, tma=True)
    assert_close(y, reference_linear(x, weight, bias), dtype, reduction=in_f, what="forward")

    grad_x = torch.full((m, k * in_f), float("nan"), dtype=dtype)
    assert tma.tma_layouts(gg._groups(grad_y, k), weight) == (True, True)
    gg.launch_grouped_gemm(gg._groups(grad_y, k), weight, gg._groups(grad_x, k), tma=True)
    ref_grad_x = torch.cat(
        [grad_y[:, i * out_f : (i + 1) * out_f].double() @ weight[i].double() for i in range(k)], dim=1
    )
    assert_close(grad_x, ref_grad_x, dtype, reduction=out_f, what="backward input")

    grad_w = torch.full((k, out_f, in_f), float("nan"), dtype=dtype)
    grad_y_t = grad_y.unflatten(1, (k, out_f)).permute(1, 2, 0)
    assert tma.tma_layouts(grad_y_t, gg._groups(x, k)) == (False, True)
    gg.launch_grouped_gemm(grad_y_t, gg._groups(x, k), grad_w, tma=True, batch_reduction=True)
    ref_grad_w = torch.stack(
        [grad_y[:, i * out_f : (i + 1) * out_f].double().T @ x[:, i * in_f : (i + 1) * in_f].double() for i in range(k)]
    )
    assert_close(grad_w, ref_grad_w, dtype, reduction=m, what="backward weight")


def test_tma_path_refuses_operands_that_break_the_alignment_rules():
    """Group or row strides that are not multiples of 16 bytes, no unit stride, fp64, or a misaligned base: the
    automatic choice falls back to cp.async and tma=True is a clear error."""
    from groupnet.kernels import grouped_gemm_tma as tma

    x = torch.zeros(4, 2 * 6, dtype=torch.float16)  # in = 6: a 12-byte group stride
    w = torch.zeros(2, 8, 6, dtype=torch.float16)
    assert tma.tma_layouts(gg._groups(x, 2), w.transpose(1, 2)) is None
    assert tma.tma_layouts(torch.zeros(1, 8, 8, dtype=torch.float64), torch.zeros(1, 8, 8, dtype=torch.float64)) is None
    gapped = torch.zeros(1, 8, 16)[:, :, ::2]  # no unit stride
    assert tma.tma_layouts(gapped, torch.zeros(1, 8, 8)) is None
    shifted = torch.zeros(1 + 8 * 8)[1:].view(1, 8, 8)  # 4-byte-aligned base
    assert tma.tma_layouts(shifted, torch.zeros(1, 8, 8)) is None
    assert tma.tma_layouts(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)) == (True, True)
    with pytest.raises(ValueError, match="tma=True needs .* multiples of 16 bytes"):
        gg.launch_grouped_gemm(gg._groups(x, 2), w.transpose(1, 2), torch.zeros(2, 4, 8, dtype=torch.float16), tma=True)
