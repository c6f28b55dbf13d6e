"""The Triton grouped conv2d (run by the interpreter on CPU tensors) against float64 torch references.

Each pass is compared with ``F.conv2d`` / ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` (``groups=K*groups``)
computed in float64 on the same, already rounded inputs (tolerances: tests/helpers/tolerances.py). Inputs live
inside NaN-filled buffers and outputs inside sentinel-filled buffers (tests/helpers/oob.py): a kernel reading or
writing out of bounds, or leaving an output element unwritten, shows up as a NaN or a sentinel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers.compare import float64_leaves
from helpers.oob import Embedded, assert_no_oob, nan_embedded, sentinel_output
from helpers.strategies import conv_cases
from helpers.tolerances import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from groupnet.kernels import _grouped_conv2d_common as common
from groupnet.kernels import grouped_conv2d as conv_module
from groupnet.kernels._grouped_conv2d_common import ConvGeometry
from groupnet.kernels.grouped_conv2d import grouped_conv2d, roofline_cases
from groupnet.kernels.grouped_conv2d_bwd_input import BWD_INPUT_CONFIGS, grouped_conv2d_bwd_input
from groupnet.kernels.grouped_conv2d_bwd_weight import (
    BWD_WEIGHT_CONFIGS,
    BWD_WEIGHT_FMA_CONFIGS,
    grouped_conv2d_bwd_weight,
)
from groupnet.kernels.grouped_conv2d_fwd import FWD_CONFIGS, grouped_conv2d_fwd

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def nan_padded(t: Tensor, channels_last: bool) -> Tensor:
    """A copy of ``t`` inside a NaN-filled buffer; 4-d tensors channels_last (channel stride 1) if asked."""
    if channels_last and t.dim() == 4:
        return nan_embedded(t.permute(TO_NHWC)).permute(TO_NCHW)
    return nan_embedded(t)


def sentinel_padded(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> tuple[Embedded, Tensor]:
    """An output inside a sentinel-filled buffer: (the Embedded to check, the NCHW view to write)."""
    if channels_last and len(shape) == 4:
        out = sentinel_output(tuple(shape[i] for i in TO_NHWC), dtype)
        return out, out.view.permute(TO_NCHW)
    out = sentinel_output(tuple(shape), dtype)
    return out, out.view


def rand(shape, dtype, gen) -> Tensor:
    """fp64 normals rounded to ``dtype`` (the rounded values are what both sides see)."""
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)


def check_all_passes(case, *, dtype, bias, relu, channels_last, split_rows, seed, configs=(None, None, None)):
    """Run the three launchers on NaN-padded inputs into sentinel-padded outputs; compare with fp64 torch.

    ``configs``: fixed launch configs (forward, input gradient, weight gradient); None autotunes.
    """
    gen = torch.Generator().manual_seed(seed)
    g = case["k"] * case["groups"]
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"])
    x = rand((case["n"], g * case["cin_g"], case["h"], case["w"]), dtype, gen)
    w = rand((g * case["cout_g"], case["cin_g"], case["kh"], case["kw"]), dtype, gen)
    b = rand((g * case["cout_g"],), dtype, gen) if bias else None
    x64, w64 = x.double(), w.double()
    y_ref = F.conv2d(x64, w64, None if b is None else b.double(), groups=g, **conv)
    if relu:
        y_ref = y_ref.relu()
    taps = case["kh"] * case["kw"]
    pixels = y_ref.shape[0] * y_ref.shape[2] * y_ref.shape[3]  # the weight-gradient reduction length

    xv, wv = nan_padded(x, channels_last), nan_padded(w, channels_last)
    bv = None if b is None else nan_padded(b, False)
    y, yv = sentinel_padded(y_ref.shape, dtype, channels_last)
    grouped_conv2d_fwd(xv, wv, bv, yv, groups=g, activation="relu" if relu else None, config=configs[0], **conv)
    assert_no_oob(y, "forward")
    assert_close(yv, y_ref, dtype, reduction=case["cin_g"] * taps, what="forward")

    # The ReLU mask comes from the kernel's own (rounded) output, as in autograd.
    dy = rand(y_ref.shape, dtype, gen)
    dz64 = dy.double() * (yv.double() > 0) if relu else dy.double()
    dyv = nan_padded(dy, channels_last)
    relu_output = nan_padded(yv, channels_last) if relu else None

    dx, dxv = sentinel_padded(x.shape, dtype, channels_last)
    grouped_conv2d_bwd_input(dyv, wv, dxv, groups=g, relu_output=relu_output, config=configs[1], **conv)
    assert_no_oob(dx, "input gradient")
    dx_ref = torch.nn.grad.conv2d_input(x.shape, w64, dz64, groups=g, **conv)
    assert_close(dxv, dx_ref, dtype, reduction=case["cout_g"] * taps, what="input gradient")

    dw, dwv = sentinel_padded(w.shape, dtype, channels_last)
    db, dbv = sentinel_padded((w.shape[0],), dtype, False) if bias else (None, None)
    grouped_conv2d_bwd_weight(
        xv, dyv, dwv, dbv, groups=g, relu_output=relu_output, split_rows=split_rows, config=configs[2], **conv
    )
    assert_no_oob(dw, "weight gradient")
    dw_ref = torch.nn.grad.conv2d_weight(x64, w.shape, dz64, groups=g, **conv)
    assert_close(dwv, dw_ref, dtype, reduction=pixels, what="weight gradient")
    if bias:
        assert_no_oob(db, "bias gradient")
        assert_close(dbv, dz64.sum((0, 2, 3)), dtype, reduction=pixels, what="bias gradient")


@settings(max_examples=20)
@given(
    case=conv_cases(max_channels=12),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    bias=st.booleans(),
    relu=st.booleans(),
    channels_last=st.booleans(),
    # None: the default split (64 rows under the interpreter); 40 puts split boundaries inside a BLOCK_R tile.
    split_rows=st.sampled_from([40, None, 10**6]),
    seed=st.integers(0, 2**16),
)
def test_passes_match_torch(case, dtype, bias, relu, channels_last, split_rows, seed):
    check_all_passes(
        case, dtype=dtype, bias=bias, relu=relu, channels_last=channels_last, split_rows=split_rows, seed=seed
    )


# Fixed configs with other tile shapes than the interpreter's autotune config (the ``config=`` launch path).
WIDE_CONFIGS = (
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
    triton.Config({"BLOCK_CO": 32, "BLOCK_CI": 16, "BLOCK_R": 32}),
)


@settings(max_examples=4)
@given(
    k=st.integers(1, 2),
    cin_g=st.integers(17, 21),
    cout_g=st.integers(17, 20),
    stride=st.integers(1, 2),
    channels_last=st.booleans(),
    fixed_configs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_channel_tails_across_tiles(k, cin_g, cout_g, stride, channels_last, fixed_configs, seed):
    """More than one 16-wide channel tile per group (input, output and reduction tiles with masked tails), with
    the autotuned interpreter config or fixed configs of other tile shapes."""
    case = dict(
        n=1, k=k, groups=1, cin_g=cin_g, cout_g=cout_g, kh=3, kw=3, h=3, w=4,
        stride=(stride, stride), padding=(1, 1), dilation=(1, 1),
    )  # fmt: skip
    check_all_passes(
        case, dtype=torch.float32, bias=True, relu=True, channels_last=channels_last, split_rows=None, seed=seed,
        configs=WIDE_CONFIGS if fixed_configs else (None, None, None),
    )  # fmt: skip


@pytest.mark.parametrize("stride, dilation", [((3, 2), (2, 1)), ((2, 4), (2, 2)), ((3, 1), (3, 3))])
def test_input_grad_tap_phases(stride, dilation):
    """Strides beyond 2 and dilations sharing a factor with the stride: the per-phase tap progression (first tap,
    step stride/gcd(stride, dilation), phases with no tap at all) is the whole input gradient."""
    gen = torch.Generator().manual_seed(7)
    x_shape = (1, 2, 9, 8)
    w = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    conv = dict(stride=stride, padding=(1, 2), dilation=dilation)
    out_shape = F.conv2d(torch.empty(x_shape, device="meta"), w.to("meta"), **conv).shape
    dy = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    dx = grouped_conv2d_bwd_input(dy, w, torch.empty(x_shape, dtype=torch.float64), groups=1, **conv)
    assert_close(dx, torch.nn.grad.conv2d_input(x_shape, w, dy, **conv), torch.float64, reduction=18, what="dx")


@pytest.mark.parametrize("split_rows", [7, 40, 97])
def test_weight_grad_split_boundaries(split_rows):
    """Split boundaries inside a BLOCK_R tile (7, 40) and a last split of one row (97 of 98): no row is counted by
    two splits or dropped."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64)
    conv = dict(stride=(1, 1), padding=(0, 1), dilation=(1, 1))
    dw, db = grouped_conv2d_bwd_weight(x, dy, torch.empty(4, 3, 1, 3, dtype=torch.float64),
                                       torch.empty(4, dtype=torch.float64), groups=1, split_rows=split_rows,
                                       **conv)  # fmt: skip
    dw_ref = torch.nn.grad.conv2d_weight(x, (4, 3, 1, 3), dy, **conv)
    assert_close(dw, dw_ref, torch.float64, reduction=98, what="dw")
    assert_close(db, dy.sum((0, 2, 3)), torch.float64, reduction=98, what="db")


@pytest.mark.parametrize(
    "conv",
    [
        dict(stride=2, padding=1, dilation=1, groups=1, activation="relu"),
        dict(stride=(1, 2), padding=(0, 2), dilation=(2, 1), groups=2, activation=None),
    ],
)
def test_gradcheck_float64(conv):
    """The whole autograd op in float64 (the interpreter runs fp64 kernels with fp64 accumulation). With ReLU,
    a pre-activation within eps=1e-6 of the kink would break the finite differences; random data avoids it."""
    gen = torch.Generator().manual_seed(0)
    k, groups = 2, conv["groups"]
    x = torch.randn(1, k * groups, 4, 4, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(k * groups, 1, 2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(w.shape[0], dtype=torch.float64, generator=gen).requires_grad_()
    fn = lambda x, w, b: grouped_conv2d(x, w, b, branches=k, **conv)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


@pytest.mark.parametrize(
    "x_channels_last, w_channels_last, relu", [(False, False, True), (True, True, False), (True, False, True)]
)
def test_autograd_formats_and_stride0_grad(x_channels_last, w_channels_last, relu):
    """Eager autograd through the public op: values, memory formats of y / dx / dw, and the stride-0 gradient
    that ``y.sum().backward()`` sends."""
    gen = torch.Generator().manual_seed(1)
    k, conv = 3, dict(stride=2, padding=1, dilation=1)
    x = torch.randn(2, k * 2, 5, 6, dtype=torch.float32, generator=gen)
    w = torch.randn(k * 3, 2, 3, 3, dtype=torch.float32, generator=gen)
    b = torch.randn(k * 3, dtype=torch.float32, generator=gen)
    if x_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if w_channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = grouped_conv2d(x, w, b, branches=k, activation="relu" if relu else None, input_precision="ieee", **conv)
    assert y.is_contiguous(memory_format=torch.channels_last if x_channels_last else torch.contiguous_format)
    y.sum().backward()

    refs = float64_leaves(x, w, b)
    y_ref = F.conv2d(*refs, groups=k, **conv)
    (y_ref.relu() if relu else y_ref).sum().backward()
    assert_close(y, y_ref.relu() if relu else y_ref, torch.float32, reduction=18, what="forward")
    for name, t, ref, reduction in zip(("dx", "dw", "db"), (x, w, b), refs, (27, 18, 18)):
        assert_close(t.grad, ref.grad, torch.float32, reduction=reduction, what=name)
    assert x.grad.is_contiguous(memory_format=torch.channels_last if x_channels_last else torch.contiguous_format)
    assert w.grad.is_contiguous(memory_format=torch.channels_last if w_channels_last else torch.contiguous_format)


def test_only_the_needed_gradients():
    """needs_input_grad is respected: a frozen weight gets no gradient, the input still does (and bias alone)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 4, 4, generator=gen, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen, requires_grad=True)
    grouped_conv2d(x, w, b, branches=2, padding=1, input_precision="ieee").square().sum().backward()
    xr, br = float64_leaves(x, b)
    F.conv2d(xr, w.double(), br, padding=1, groups=2).square().sum().backward()
    assert w.grad is None
    assert_close(x.grad, xr.grad, torch.float32, reduction=27, what="dx")
    assert_close(b.grad, br.grad, torch.float32, reduction=16, what="db")


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 2, 3, 3, generator=gen, requires_grad=True)

    def fn(x, w):
        return grouped_conv2d(x, w, None, branches=2, stride=2, padding=1, activation="relu", input_precision="ieee")

    torch._dynamo.reset()
    y = torch.compile(fn, backend=backend, fullgraph=True)(x, w)
    (y * y).sum().backward()
    xr, wr = float64_leaves(x, w)
    y_ref = F.conv2d(xr, wr, stride=2, padding=1, groups=2).relu()
    (y_ref * y_ref).sum().backward()
    assert_close(y, y_ref, torch.float32, reduction=18, what="forward")
    assert_close(x.grad, xr.grad, torch.float32, reduction=27, what="dx")
    assert_close(w.grad, wr.grad, torch.float32, reduction=18, what="dw")


def test_opcheck_inner_ops():
    """Schema, fake tensors (shapes and strides), autograd registration and aot dispatch of the three custom ops."""
    gen = torch.Generator().manual_seed(4)
    conv = ([2, 1], [1, 0], [1, 2])
    x = torch.randn(1, 4, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 2, 2, generator=gen)
    b = torch.randn(6, generator=gen)
    ops = torch.ops.groupnet
    y = ops.grouped_conv2d_forward(x, w, b, *conv, 2, "relu", "ieee")
    dy = torch.randn(y.shape, generator=gen)
    cases = [
        (ops.grouped_conv2d_forward, (x, w, b, *conv, 2, "relu", "ieee")),
        (ops.grouped_conv2d_forward, (x.contiguous(), w, None, *conv, 2, None, "ieee")),
        (ops.grouped_conv2d_backward_input, (dy, w, y, list(x.shape), *conv, 2, True, "ieee")),
        (ops.grouped_conv2d_backward_weight, (x, dy, None, list(w.shape), True, *conv, 2, False, "ieee")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    x = torch.randn(1, 6, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="= 2\\*2 = 4, got 6"):
        grouped_conv2d(x, torch.randn(4, 2, 3, 3), branches=2)  # wrong K*Cin for this weight
    with pytest.raises(ValueError, match="4-d input"):
        grouped_conv2d(x[0], w, branches=2)
    with pytest.raises(TypeError, match="float16 does not match weight dtype torch.float32"):
        grouped_conv2d(x.half(), w, branches=2)
    with pytest.raises(RuntimeError, match="meta"):
        grouped_conv2d(x, w.to("meta"), branches=2)
    with pytest.raises(TypeError, match="supports dtypes"):
        grouped_conv2d(x.to(torch.int32), w.to(torch.int32), branches=2)
    with pytest.raises(ValueError, match="bias must have shape"):
        grouped_conv2d(x, w, torch.randn(5), branches=2)
    with pytest.raises(ValueError, match="activation"):
        grouped_conv2d(x, w, branches=2, activation="gelu")
    with pytest.raises(ValueError, match="input_precision"):
        grouped_conv2d(x, w, branches=2, input_precision="bf16x3")
    with pytest.raises(ValueError, match="stride must be two ints >= 1"):
        grouped_conv2d(x, w, branches=2, stride=0)
    with pytest.raises(ValueError, match="empty"):
        grouped_conv2d(x, w, branches=2, dilation=3)  # 5x5 input, a dilated 3x3 kernel spans 7
    conv = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2)
    with pytest.raises(ValueError, match="out must be"):
        grouped_conv2d_fwd(x, w, None, torch.empty(1, 4, 2, 2), **conv)
    with pytest.raises(ValueError, match="grad_out must be"):
        grouped_conv2d_bwd_input(torch.randn(1, 4, 2, 2), w, torch.empty_like(x), **conv)
    with pytest.raises(TypeError, match="weight_out has dtype torch.float16"):
        grouped_conv2d_bwd_weight(x, torch.randn(1, 4, 3, 3), torch.empty(4, 3, 3, 3, dtype=torch.float16), **conv)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_conv2d(x, w, branches=2)


def test_stride0_grad_out_in_the_launchers():
    """An expanded (all strides 0) gradient is read through its strides, not as if contiguous."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    conv = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    dy = torch.tensor(0.75, dtype=torch.float64).expand(2, 6, 3, 3)
    assert dy.stride() == (0, 0, 0, 0)
    dx = grouped_conv2d_bwd_input(dy, w, torch.empty_like(x), groups=2, **conv)
    dw, db = grouped_conv2d_bwd_weight(x, dy, torch.empty_like(w), torch.empty(6, dtype=torch.float64), groups=2,
                                       **conv)  # fmt: skip
    dense = dy.contiguous()
    dx_ref = torch.nn.grad.conv2d_input(x.shape, w, dense, groups=2, **conv)
    dw_ref = torch.nn.grad.conv2d_weight(x, w.shape, dense, groups=2, **conv)
    assert_close(dx, dx_ref, torch.float64, reduction=27, what="dx")
    assert_close(dw, dw_ref, torch.float64, reduction=18, what="dw")
    assert_close(db, dense.sum((0, 2, 3)), torch.float64, reduction=18, what="db")


def test_empty_batch():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    y = grouped_conv2d(x, w, branches=2, padding=1)
    assert y.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_roofline_cases_count_what_torch_counts():
    """FLOPs of each case equal torch's FlopCounterMode on the same conv (meta tensors); bytes are the sizes of
    input, weight and output in bf16. The shapes are those of the split WRN-28-10 the roofline report uses."""
    from torch.utils.flop_counter import FlopCounterMode

    from groupnet.roofline import workloads

    convs = [w for w in workloads(batch=4)["grouped_conv2d"] if w.branches == 2]
    assert len(convs) >= 8  # stem, the first conv and shortcut of each stage, the repeated convs
    cases = roofline_cases(convs)
    assert {c["dtype"] for c in cases} == {"bf16"}
    for w in convs:
        k, ks, s, hw = w.branches, w.kernel, w.stride, w.size
        x = torch.empty(4, k * w.cin, hw, hw, device="meta")
        weight = torch.empty(k * w.cout, w.cin, ks, ks, device="meta")
        with FlopCounterMode(display=False) as counter:
            y = F.conv2d(x, weight, stride=s, padding=ks // 2, groups=k)
        fwd = next(c for c in cases if c["name"].startswith(f"conv fwd K={k} {w.name} "))
        assert fwd["flops"] == counter.get_total_flops()
        assert fwd["bytes"] == 2 * (x.numel() + weight.numel() + y.numel())


def test_geometry_matches_torch_output_size():
    geom = ConvGeometry.of((2, 6, 7, 5), (9, 2, 3, 2), (2, 1), (1, 2), (2, 1), 3)
    y = F.conv2d(torch.empty(2, 6, 7, 5, device="meta"), torch.empty(9, 2, 3, 2, device="meta"), None, (2, 1), (1, 2),
                 (2, 1), 3)  # fmt: skip
    assert geom.output_size == tuple(y.shape)



@triton.jit
def _split_bounds_probe(out_ptr, split, SPLIT_ROWS, R):
    start, end = common.split_bounds(split, SPLIT_ROWS, R)
    tl.store(out_ptr, start)
    tl.store(out_ptr + 1, end)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 2**31 - 1), split_rows=st.integers(1, 2**31 - 1), data=st.data())
def test_weight_gradient_split_bounds_do_not_wrap_near_the_int32_limit(rows, split_rows, data):
    """The weight-gradient pass's split bounds, computed in int32 as in the kernel, near R = 2**31: the last
    split's end is R, never a wrapped negative number that would drop its rows from dW."""
    splits = triton.cdiv(rows, split_rows)
    split = data.draw(st.sampled_from(sorted({0, splits - 1, splits // 2})))
    out = torch.zeros(2, dtype=torch.int32)
    _split_bounds_probe[(1,)](out, split, split_rows, rows)
    start = split * split_rows
    assert out.tolist() == [start, min(start + split_rows, rows)]


def test_the_pixel_check_keeps_one_tile_of_headroom():
    limit = 2**31 - common.MAX_PIXEL_BLOCK
    common.check_int32_pixels("probe", limit, "pixels")
    with pytest.raises(ValueError, match="int32 pixel index"):
        common.check_int32_pixels("probe", limit + 1, "pixels")


def test_every_conv_config_fits_the_pixel_headroom():
    blocks = [c.kwargs["BLOCK_M"] for c in (*FWD_CONFIGS, *BWD_INPUT_CONFIGS)]
    blocks += [c.kwargs["BLOCK_R"] for c in (*BWD_WEIGHT_CONFIGS, *BWD_WEIGHT_FMA_CONFIGS)]
    assert max(blocks) <= common.MAX_PIXEL_BLOCK


@pytest.mark.parametrize(
    "kh, kw, stride, dilation",
    [(1, 1, 1, 1), (1, 1, 2, 1), (3, 3, 1, 1), (3, 3, 2, 1), (3, 3, 1, 2), (1, 3, 2, 1)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_constexpr_kernel_sizes(kh, kw, stride, dilation, channels_last):
    """The kernel sizes are compile-time constants (the tap loop divides by them at compile time, and 1x1 has no
    tap arithmetic at all): 1x1 and 3x3 with strides, dilation and channel counts over one channel block, every
    pass against float64 torch."""
    case = dict(
        n=2, k=2, groups=1, cin_g=18, cout_g=17, kh=kh, kw=kw, h=5, w=6,
        stride=(stride, stride), padding=(kh // 2 * dilation, kw // 2 * dilation), dilation=(dilation, dilation),
    )  # fmt: skip
    check_all_passes(
        case, dtype=torch.float32, bias=True, relu=True, channels_last=channels_last, split_rows=None, seed=kh + kw
    )


# The GPU configs of each pass, by position: every tile shape a GPU launch can pick (forward, input gradient and
# weight gradient configs share positions; the lists have equal length), then the weight-gradient tiles that only
# FMA launches take.
GPU_CONFIG_ROWS = list(zip(FWD_CONFIGS, BWD_INPUT_CONFIGS, BWD_WEIGHT_CONFIGS)) + [
    (FWD_CONFIGS[-1], BWD_INPUT_CONFIGS[-1], weight) for weight in BWD_WEIGHT_FMA_CONFIGS]


@pytest.mark.parametrize("configs", GPU_CONFIG_ROWS, ids=lambda c: "-".join(
    "x".join(str(v) for v in cfg.kwargs.values()) for cfg in c))
def test_every_gpu_config_shape_under_the_interpreter(configs):
    """Each GPU tile shape (256-row and 256-column tiles, reduction blocks of 64 and 128, 16-wide blocks, the
    FMA-only weight-gradient tiles), forced, with the fused bias and ReLU mask, on channel counts that leave a masked
    tail in the 16-wide blocks and pad the wide ones."""
    case = dict(
        n=1, k=2, groups=1, cin_g=20, cout_g=18, kh=3, kw=3, h=5, w=4,
        stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    )  # fmt: skip
    check_all_passes(
        case, dtype=torch.float32, bias=True, relu=True, channels_last=True, split_rows=None, seed=3,
        configs=configs,
    )  # fmt: skip


@pytest.mark.parametrize("channels", [12, 24, 48, 112])
@pytest.mark.parametrize("relu", [False, True])
def test_weight_gradient_tiles_follow_the_dot_kind(channels, relu):
    """FMA launches of few channels per group tune over tiles near their size (no 64x64 tile for 12 or 24
    channels) within the FMA register budget; tensor-core launches never take a tile under 64 rows (wgmma's
    minimum on sm_90)."""
    from groupnet.kernels import grouped_conv2d_bwd_weight as bwd_weight

    configs = BWD_WEIGHT_CONFIGS + BWD_WEIGHT_FMA_CONFIGS
    sizes = {"COUT_G": channels, "CIN_G": channels}
    fma = {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "ieee", "RELU_GRAD": relu}
    kept = bwd_weight._prune(configs, sizes, **fma)
    assert kept and all(common.fits_fma_registers(c, bwd_weight.BLOCKS, 2 if relu else 1) for c in kept)
    bound = max(triton.next_power_of_2(channels), 16)
    assert all(c.kwargs["BLOCK_CO"] <= bound and c.kwargs["BLOCK_CI"] <= bound for c in kept)
    for dot in ({"DOT_DTYPE": tl.bfloat16}, {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "tf32"}):
        tensor_core = bwd_weight._prune(configs, sizes, RELU_GRAD=relu, **dot)
        assert tensor_core and all(c.kwargs["BLOCK_CO"] >= bwd_weight.MIN_TENSOR_CORE_ROWS for c in tensor_core)


def test_config_lists_align_by_position():
    assert len(FWD_CONFIGS) == len(BWD_INPUT_CONFIGS) == len(BWD_WEIGHT_CONFIGS)


@pytest.mark.parametrize("channels", [80, 112])
def test_pinned_config_avoids_padding_on_80_and_112_channels(channels):
    """The pinned rule is a function of the shape alone; on 80/112-channel layers it pads no more than the
    128x128 tile (80 channels: not at all), on 640 channels it picks the 128x128 tile."""
    sizes = (64 * 32 * 32, channels, channels)
    chosen = common.pinned_config(FWD_CONFIGS, common.MNK_BLOCKS, sizes)
    assert chosen is common.pinned_config(list(FWD_CONFIGS), common.MNK_BLOCKS, sizes)  # no state, no timing
    padded = common.padded_work(chosen, common.MNK_BLOCKS, sizes)
    assert padded <= common.padded_work(FWD_CONFIGS[0], common.MNK_BLOCKS, sizes)
    assert padded == 1.0 or channels != 80
    wide = common.pinned_config(FWD_CONFIGS, common.MNK_BLOCKS, (64 * 8 * 8, 640, 640))
    assert (wide.kwargs["BLOCK_M"], wide.kwargs["BLOCK_N"]) == (128, 128)
    weight = common.pinned_config(BWD_WEIGHT_CONFIGS, ("BLOCK_CO", "BLOCK_CI", "BLOCK_R"), (channels, channels, 4096))
    assert weight in BWD_WEIGHT_CONFIGS


def test_deterministic_algorithms_pin_the_launch_config(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) every launcher runs the pinned config of its shape (not the
    autotuner's timing-dependent pick); otherwise the autotuner runs."""
    picked = []
    real = common.pinned_config

    def recording(configs, blocks, sizes):
        picked.append((blocks, sizes))
        return real(configs, blocks, sizes)

    monkeypatch.setattr(common, "pinned_config", recording)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert common.configs_pinned()
        y = grouped_conv2d_fwd(x, w, None, torch.empty(1, 6, 5, 5, dtype=torch.float64), **conv)
        grouped_conv2d_bwd_input(y, w, torch.empty_like(x), **conv)
        grouped_conv2d_bwd_weight(x, y, torch.empty_like(w), **conv)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert [sizes for _, sizes in picked] == [(25, 3, 2), (25, 2, 3), (3, 2, 25)]
    assert_close(y, F.conv2d(x, w, padding=1, groups=2), torch.float64, reduction=18, what="pinned forward")
    picked.clear()
    grouped_conv2d_fwd(x, w, None, torch.empty(1, 6, 5, 5, dtype=torch.float64), **conv)
    assert picked == [] and not common.configs_pinned()


def test_prune_keeps_no_tile_that_is_mostly_padding():
    prune = common.prune_oversized(common.MNK_BLOCKS, (None, "COUT_G", "CIN_G"))  # the batch's axis: not pruned
    kept = prune(FWD_CONFIGS, {"M": 64, "COUT_G": 16, "CIN_G": 160})
    assert kept and all(c.kwargs["BLOCK_N"] == 16 for c in kept)
    assert prune(FWD_CONFIGS, {"M": 10**6, "COUT_G": 640, "CIN_G": 640}) == FWD_CONFIGS
    # The 3-channel stem: the smallest reduction block offered is kept however small the channel count.
    stem = prune(FWD_CONFIGS, {"M": 10**6, "COUT_G": 16, "CIN_G": 3})
    assert stem and all(c.kwargs["BLOCK_K"] == 16 for c in stem)


def test_register_budget_drops_fma_tiles_and_keeps_the_rest():
    """fp32-ieee (FMA) launches never tune or pin a tile past FMA_ELEMENTS_PER_THREAD (128x128 on 8 warps: 255
    registers with spills on sm_80); tensor-core launches keep every config; some config always survives."""
    import triton.language as tl

    from groupnet.kernels import grouped_conv2d_bwd_weight as bwd_weight

    fma = {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "ieee"}
    tf32 = {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "tf32"}
    kept = common.within_register_budget(FWD_CONFIGS, common.MNK_BLOCKS, fma)
    assert kept and all(common.fits_fma_registers(c, common.MNK_BLOCKS) for c in kept)
    assert not any(c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128 for c in kept)
    assert common.within_register_budget(FWD_CONFIGS, common.MNK_BLOCKS, tf32) == FWD_CONFIGS
    prune = common.prune_oversized(common.MNK_BLOCKS, (None, "COUT_G", "CIN_G"))
    assert prune(FWD_CONFIGS, {"M": 10**6, "COUT_G": 640, "CIN_G": 640}, **fma) == kept
    assert prune(FWD_CONFIGS, {"M": 10**6, "COUT_G": 16, "CIN_G": 3}, **fma)  # the stem keeps a tile
    blocks = bwd_weight.BLOCKS
    fma_weight = common.within_register_budget(BWD_WEIGHT_CONFIGS, blocks, fma)
    assert fma_weight and all(common.fits_fma_registers(c, blocks) for c in fma_weight)
    assert common.within_register_budget(BWD_WEIGHT_CONFIGS, blocks, tf32) == BWD_WEIGHT_CONFIGS
    huge = common.tile_configs(blocks, [(256, 256, 128, 4, 2)])
    assert common.within_register_budget(huge, blocks, fma) == huge  # nothing fits: every config stays


@given(rows=st.sampled_from([16, 32, 64, 128, 256]), cols=st.sampled_from([16, 32, 64, 128]),
       depth=st.sampled_from([16, 32, 64, 128]), warps=st.sampled_from([4, 8]), relu=st.booleans())
@settings(max_examples=60, deadline=None)
def test_register_budget_counts_the_relu_mask_and_halves_the_reduction_block(rows, cols, depth, warps, relu):
    """A ReLU-gradient FMA launch loads the saved output beside the gradient (two row tiles per step), so its tiles
    are judged with both; when no config fits, a config that fits without the mask comes back with a halved
    reduction block (the split WRN-28-10's 112-channel weight gradient with bias+ReLU spilled inside its loop on
    sm_80 at 128x64x32 and 64x64x32, and built without spills at 128x64x16 and 64x64x16)."""
    from groupnet.kernels import grouped_conv2d_bwd_weight as bwd_weight

    blocks = bwd_weight.BLOCKS
    args = {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "ieee", "RELU_GRAD": relu}
    row_tiles = 2 if relu else 1
    (config,) = common.tile_configs(blocks, [(rows, cols, depth, warps, 3)])
    kept = common.within_register_budget([config], blocks, args)
    assert len(kept) == 1
    (got,) = kept
    assert (got.num_warps, got.num_stages) == (config.num_warps, config.num_stages)
    assert all(got.kwargs[b] == config.kwargs[b] for b in blocks[:2])
    if common.fits_fma_registers(config, blocks, row_tiles):
        assert got is config
    elif not common.fits_fma_registers(config, blocks):
        assert got is config  # over budget even without the mask: nothing fits, every config stays
    elif got is config:  # not even the smallest reduction block fits
        (smallest,) = common.tile_configs(blocks, [(rows, cols, common.MIN_FMA_REDUCTION_BLOCK, warps, 3)])
        assert not common.fits_fma_registers(smallest, blocks, row_tiles)
    else:  # the largest halving of the reduction block that fits
        assert got.kwargs[blocks[2]] < depth and common.fits_fma_registers(got, blocks, row_tiles)
        (doubled,) = common.tile_configs(blocks, [(rows, cols, 2 * got.kwargs[blocks[2]], warps, 3)])
        assert not common.fits_fma_registers(doubled, blocks, row_tiles)
    # the configs the weight gradient tunes over for the split WRN-28-10's bias+ReLU layer fit with the mask
    wrn = common.within_register_budget(BWD_WEIGHT_CONFIGS, blocks, {**args, "RELU_GRAD": True})
    assert wrn and all(common.fits_fma_registers(c, blocks, 2) for c in wrn)


def test_prologue_budget_drops_wide_fp32_tiles_only():
    """The fused BN + ReLU prologue holds an fp32 input tile in registers: with 32-bit operands it keeps at most
    PROLOGUE_FP32_ACCUMULATORS_PER_THREAD (tf32) or PROLOGUE_FMA_ACCUMULATORS_PER_THREAD (ieee) accumulators per
    thread, 16-bit operands keep every prologue config, and the autotuner's pruning and the pinned path agree."""
    from groupnet.kernels import grouped_conv2d_fwd as fwd

    configs = fwd.PROLOGUE_FWD_CONFIGS
    assert fwd.within_prologue_budget(configs, {"DOT_DTYPE": tl.bfloat16, "INPUT_PRECISION": "ieee"}) == configs
    for precision, limit in (("tf32", fwd.PROLOGUE_FP32_ACCUMULATORS_PER_THREAD),
                             ("ieee", fwd.PROLOGUE_FMA_ACCUMULATORS_PER_THREAD)):
        args = {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": precision}
        kept = fwd.within_prologue_budget(configs, args)
        assert kept and len(kept) < len(configs)
        assert all(common.accumulators_per_thread(c, common.MNK_BLOCKS) <= limit for c in kept)
        pruned = fwd._prune_prologue(configs, {"M": 10**6, "COUT_G": 448, "CIN_G": 448}, **args)
        assert pruned and all(c in kept for c in pruned)


def test_tf32_forward_budget_drops_wide_operand_tiles_on_8_warps_only():
    """tf32 forwards never tune or pin an 8-warp tile past TF32_OPERANDS_PER_THREAD (256x64x32: 234 registers on
    sm_80); 4-warp tiles, 16-bit and fp32-ieee launches are left to the other budgets."""
    from groupnet.kernels import grouped_conv2d_fwd as fwd

    tf32 = {"DOT_DTYPE": tl.float32, "INPUT_PRECISION": "tf32"}
    kept = fwd.within_tf32_budget(FWD_CONFIGS, tf32)
    dropped = [c for c in FWD_CONFIGS if c not in kept]
    assert dropped and all(c.num_warps == 8 for c in dropped)
    assert any(c.kwargs == {"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32} for c in dropped)
    assert all(c.num_warps < 8 or common.operands_per_thread(c, common.MNK_BLOCKS) <= fwd.TF32_OPERANDS_PER_THREAD
               for c in kept)
    assert fwd.within_tf32_budget(FWD_CONFIGS, {"DOT_DTYPE": tl.bfloat16, "INPUT_PRECISION": "ieee"}) == FWD_CONFIGS
    pruned = fwd._prune_forward(FWD_CONFIGS, {"M": 10**6, "COUT_G": 448, "CIN_G": 448}, **tf32)
    assert pruned and all(c in kept for c in pruned)


def test_launchers_run_the_kernels_on_channel_contiguous_tensors_only():
    """An operand whose channel stride is not 1 (NCHW, an expanded gradient) is copied to channels_last before the
    launch, and an NCHW output is written through a channels_last buffer, so no kernel gathers channels; the
    captured launches of every pass, given NCHW tensors and an expanded gradient, carry channel stride 1."""
    from groupnet.kernels._common import capture_launches

    def meta(*size):
        return torch.empty(size, dtype=torch.bfloat16, device="meta")

    x, w = meta(2, 32, 8, 8), meta(32, 16, 3, 3)  # NCHW, 2 groups of 16 channels
    grad = meta(2, 32, 1, 1).expand(2, 32, 8, 8)  # channel stride 1, spatial strides 0: kept as it is
    grad_nchw = meta(2, 1, 8, 8).expand(2, 32, 8, 8)  # channel stride 0: copied
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)
    with capture_launches() as records:
        grouped_conv2d_fwd(x, w, None, meta(2, 32, 8, 8), **conv, tma=False)
        grouped_conv2d_bwd_input(grad_nchw, w, meta(2, 32, 8, 8), **conv, tma=False)
        grouped_conv2d_bwd_weight(x, grad, meta(32, 16, 3, 3), **conv, split_rows=128, tma=False)
    assert len(records) == 3
    launched = [dict(zip(kernel.arg_names, args)) for kernel, args, _constexprs, _config in records]
    for args in launched:
        channel_strides = {k: v for k, v in args.items() if k in ("sx_c", "sdy_c", "sy_c", "sdx_c", "sw_i")}
        assert len(channel_strides) >= 3 and all(v == 1 for v in channel_strides.values()), args
    assert launched[2]["sdy_h"] == launched[2]["sdy_w"] == 0  # a channel-contiguous expanded gradient stays


def test_channel_alignment_is_the_largest_power_of_two_dividing_every_value():
    """The conv kernels' CH_ALIGN: 24 channels in rows of 48 show 8-element (16-byte bf16) alignment, which the JIT's
    divisibility-by-16 specialization cannot; 12 channels 4; the stem's 3 nothing; zero strides do not limit it."""
    assert common.channel_alignment(24, 48, 48 * 16, 48 * 16 * 16) == 8
    assert common.channel_alignment(12, 24, 24 * 32) == 4
    assert common.channel_alignment(3, 6) == 1
    assert common.channel_alignment(64, 0, 128) == common.MAX_CHANNEL_ALIGNMENT


def test_autotune_keys_name_precision_groups_kernel_size_and_dilation():
    from groupnet.kernels import grouped_conv2d_bwd_input as bwd_input
    from groupnet.kernels import grouped_conv2d_bwd_weight as bwd_weight
    from groupnet.kernels import grouped_conv2d_fwd as fwd

    for tuned in (fwd._grouped_conv2d_fwd_autotuned, bwd_input._grouped_conv2d_bwd_input_autotuned,
                  bwd_weight._grouped_conv2d_bwd_weight_autotuned):  # fmt: skip
        assert {"G", "KH", "KW", "dil_h", "dil_w", "DOT_DTYPE", "INPUT_PRECISION"} <= set(tuned.keys)
        assert set(tuned.keys) <= set(tuned.arg_names)
