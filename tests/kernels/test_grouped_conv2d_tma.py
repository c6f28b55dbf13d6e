"""The TMA grouped conv2d (forward and input gradient, stride 1) run by the interpreter against float64 torch.

The interpreter executes the descriptor loads as masked loads and checks TMA's rules on every descriptor (16-byte
aligned base and strides, unit inner stride) and load (16-byte aligned inner offset), so these tests exercise the
zero fill that stands in for the conv's padding, the tile tails and the per-group channel tails. Activations and
weights live inside NaN-filled buffers with 16-byte aligned padding (so they still qualify): a read past a tensor's
edge, or past a group's channels into the buffer's padding, turns into NaN. Outputs live in sentinel-filled buffers.
The kernels are called directly with ``tma=True`` (the automatic choice never picks them off a capability-9 GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
from helpers.compare import float64_leaves
from helpers.oob import Embedded, assert_no_oob, nan_embedded, sentinel_output
from helpers.tolerances import assert_close
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from groupnet.kernels import _grouped_conv2d_common as common
from groupnet.kernels import grouped_conv2d_tma as tma
from groupnet.kernels.grouped_conv2d import grouped_conv2d
from groupnet.kernels.grouped_conv2d_bwd_input import grouped_conv2d_bwd_input
from groupnet.kernels.grouped_conv2d_bwd_weight import grouped_conv2d_bwd_weight
from groupnet.kernels.grouped_conv2d_fwd import grouped_conv2d_fwd

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
ALIGNED_PAD = 8  # elements of NaN padding on every axis: 16 bytes or more, so strides and base stay 16-byte aligned
# Fixed configs with other tiles than the interpreter's (16, 16, 16): 64-pixel tiles span several images.
WIDE = triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32})
NARROW = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})


def aligned_nan_nhwc(t: Tensor) -> Tensor:
    """A copy of 4-d ``t`` in a channels_last view inside a NaN-filled buffer whose padding keeps TMA's alignment."""
    return nan_embedded(t.permute(TO_NHWC), pad=ALIGNED_PAD).permute(TO_NCHW)


def sentinel_nhwc(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Embedded, Tensor]:
    out = sentinel_output(tuple(shape[i] for i in TO_NHWC), dtype)
    return out, out.view.permute(TO_NCHW)


def rand(shape, dtype, gen) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)


@st.composite
def tma_conv_cases(draw):
    """Stride-1 grouped convs whose per-group channel counts meet the 16-byte rule for ``dtype``: odd spatial
    sizes, 1-3 taps per axis, padding 0-2 (borders), dilation 1-2, several groups."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    unit = 16 // torch.empty((), dtype=dtype).element_size()  # channels per 16 bytes
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    min_h, min_w = max(1, dil[0] * (kh - 1) + 1 - 2 * pad[0]), max(1, dil[1] * (kw - 1) + 1 - 2 * pad[1])
    return dict(
        dtype=dtype, n=draw(st.integers(1, 3)), g=draw(st.integers(1, 3)),
        cin_g=unit * draw(st.integers(1, 3)), cout_g=unit * draw(st.integers(1, 3)), kh=kh, kw=kw,
        h=draw(st.integers(min_h, min_h + 5)), w=draw(st.integers(min_w, min_w + 5)),
        padding=pad, dilation=dil,
    )  # fmt: skip


def run_tma_passes(case, *, bias, relu, residual, config, seed):
    """Forward (bias, residual, ReLU epilogue) and input gradient (ReLU-masked when ``relu``) on the TMA kernels."""
    dtype, g = case["dtype"], case["g"]
    gen = torch.Generator().manual_seed(seed)
    conv = dict(stride=(1, 1), padding=case["padding"], dilation=case["dilation"], groups=g)
    precision = "tf32" if dtype == torch.float32 else "ieee"  # fp32 qualifies as tf32 (the interpreter: fp32 math)
    x = rand((case["n"], g * case["cin_g"], case["h"], case["w"]), dtype, gen)
    w = rand((g * case["cout_g"], case["cin_g"], case["kh"], case["kw"]), dtype, gen)
    b = rand((g * case["cout_g"],), dtype, gen) if bias else None
    y_ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=1, padding=case["padding"],
                     dilation=case["dilation"], groups=g)  # fmt: skip
    r = rand(y_ref.shape, dtype, gen) if residual else None
    if r is not None:
        y_ref = y_ref + r.double()
    if relu:
        y_ref = y_ref.relu()
    taps = case["kh"] * case["kw"]

    xv, wv = aligned_nan_nhwc(x), aligned_nan_nhwc(w)
    bv = None if b is None else nan_embedded(b)
    rv = None if r is None else nan_embedded(r)  # read through pointers: any strides
    geom = common.ConvGeometry.of(x.shape, w.shape, (1, 1), case["padding"], case["dilation"], g)
    assert tma.why_not_tma(geom, "fwd", precision, x=xv, weight=wv) is None
    y, yv = sentinel_nhwc(tuple(y_ref.shape), dtype)
    grouped_conv2d_fwd(xv, wv, bv, yv, activation="relu" if relu else None, residual=rv, input_precision=precision,
                       config=config, tma=True, **conv)  # fmt: skip
    assert_no_oob(y, "forward")
    assert_close(yv, y_ref, dtype, reduction=case["cin_g"] * taps + 2, what="forward")

    dy = rand(y_ref.shape, dtype, gen)
    dz64 = dy.double() * (yv.double() > 0) if relu else dy.double()
    dyv = aligned_nan_nhwc(dy)
    relu_output = aligned_nan_nhwc(yv) if relu else None
    dx, dxv = sentinel_nhwc(tuple(x.shape), dtype)
    grouped_conv2d_bwd_input(dyv, wv, dxv, relu_output=relu_output, input_precision=precision, config=config,
                             tma=True, **conv)  # fmt: skip
    assert_no_oob(dx, "input gradient")
    dx_ref = torch.nn.grad.conv2d_input(x.shape, w.double(), dz64, padding=case["padding"],
                                        dilation=case["dilation"], groups=g)  # fmt: skip
    assert_close(dxv, dx_ref, dtype, reduction=case["cout_g"] * taps, what="input gradient")


@settings(max_examples=12, deadline=None)
@given(
    case=tma_conv_cases(),
    bias=st.booleans(),
    relu=st.booleans(),
    residual=st.booleans(),
    config=st.sampled_from([None, WIDE, NARROW]),
    seed=st.integers(0, 2**16),
)
@example(  # 1x1 kernel on a 1x1 image: torch gives the size-1 axes strides that break the 16-byte rule
    case=dict(dtype=torch.float16, n=2, g=2, cin_g=8, cout_g=16, kh=1, kw=1, h=1, w=1, padding=(0, 0),
              dilation=(1, 1)),
    bias=True, relu=False, residual=False, config=WIDE, seed=0,
)  # fmt: skip
@example(  # padding wider than the image on one side, taps entirely in the zero fill, three groups
    case=dict(dtype=torch.float32, n=1, g=3, cin_g=4, cout_g=8, kh=3, kw=2, h=2, w=5, padding=(2, 1),
              dilation=(2, 1)),
    bias=False, relu=True, residual=True, config=None, seed=1,
)  # fmt: skip
def test_tma_passes_match_torch(case, bias, relu, residual, config, seed):
    run_tma_passes(case, bias=bias, relu=relu, residual=residual, config=config, seed=seed)


@st.composite
def weight_grad_cases(draw):
    """Stride-1 convs with output rows of 16-20 pixels (the weight gradient's TMA path needs 16)."""
    case = draw(tma_conv_cases())
    ow = draw(st.integers(16, 20))
    case["w"] = ow - 2 * case["padding"][1] + case["dilation"][1] * (case["kw"] - 1)
    case["h"] = min(case["h"], max(1, case["dilation"][0] * (case["kh"] - 1) + 1 - 2 * case["padding"][0]) + 1)
    case["n"] = min(case["n"], 2)
    return case


@settings(max_examples=8, deadline=None)
@given(
    case=weight_grad_cases(),
    bias=st.booleans(),
    relu=st.booleans(),
    split_rows=st.sampled_from([None, 16, 40, 10**6]),
    config=st.sampled_from([None, triton.Config({"BLOCK_CO": 32, "BLOCK_CI": 16})]),
    seed=st.integers(0, 2**16),
)
def test_tma_weight_gradient_matches_torch(case, bias, relu, split_rows, config, seed):
    """Weight and bias gradient on the TMA kernel: row segments with tails past the output width, taps in the zero
    fill, several splits (16 and 40 pixels per split cut rows into segment-sized pieces)."""
    dtype, g = case["dtype"], case["g"]
    gen = torch.Generator().manual_seed(seed)
    conv = dict(stride=(1, 1), padding=case["padding"], dilation=case["dilation"], groups=g)
    precision = "tf32" if dtype == torch.float32 else "ieee"
    x = rand((case["n"], g * case["cin_g"], case["h"], case["w"]), dtype, gen)
    w_shape = (g * case["cout_g"], case["cin_g"], case["kh"], case["kw"])
    oh = case["h"] + 2 * case["padding"][0] - case["dilation"][0] * (case["kh"] - 1)
    ow = case["w"] + 2 * case["padding"][1] - case["dilation"][1] * (case["kw"] - 1)
    dy = rand((case["n"], g * case["cout_g"], oh, ow), dtype, gen)
    y = rand(dy.shape, dtype, gen).relu() if relu else None  # a ReLU output: the gradient is dy * (y > 0)
    dz64 = dy.double() * (y.double() > 0) if relu else dy.double()
    dw, dwv = sentinel_nhwc(w_shape, dtype)
    db = sentinel_output((w_shape[0],), dtype) if bias else None
    grouped_conv2d_bwd_weight(
        aligned_nan_nhwc(x), aligned_nan_nhwc(dy), dwv, None if db is None else db.view,
        relu_output=None if y is None else aligned_nan_nhwc(y), split_rows=split_rows, input_precision=precision,
        config=config, tma=True, **conv,
    )  # fmt: skip
    pixels = case["n"] * oh * ow
    assert_no_oob(dw, "weight gradient")
    dw_ref = torch.nn.grad.conv2d_weight(x.double(), w_shape, dz64, padding=case["padding"],
                                         dilation=case["dilation"], groups=g)  # fmt: skip
    assert_close(dwv, dw_ref, dtype, reduction=pixels, what="weight gradient")
    if bias:
        assert_no_oob(db, "bias gradient")
        assert_close(db.view, dz64.sum((0, 2, 3)), dtype, reduction=pixels, what="bias gradient")


def test_weight_gradient_splits_are_whole_row_segments():
    geom = common.ConvGeometry.of((2, 8, 3, 40), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 2)  # 2*3 rows of 40 pixels
    assert tma.segment_width(40) == 32 and tma.segment_width(16) == 16 and tma.segment_width(17) == 32
    assert tma.weight_grad_splits(geom, 64) == (6, 2)  # 12 segments (2 per row), 2 per split
    assert tma.weight_grad_splits(geom, 1) == (12, 1)
    assert tma.weight_grad_splits(geom, 10**6) == (1, 31250)


def test_channel_tail_does_not_read_the_next_group():
    """Per-group channel counts that are not a multiple of BLOCK_K: the last channel block of group 0 covers
    channels of group 1, which hold NaN here; the per-group descriptor's zero fill keeps them out."""
    dtype, g, cin_g, cout_g = torch.float16, 2, 8, 8
    gen = torch.Generator().manual_seed(5)
    x = rand((1, g * cin_g, 4, 3), dtype, gen)
    w = rand((g * cout_g, cin_g, 3, 3), dtype, gen)
    y_ref = F.conv2d(x.double(), w.double(), padding=1, groups=g)
    xv = aligned_nan_nhwc(x)
    y, yv = sentinel_nhwc(tuple(y_ref.shape), dtype)
    cfg = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32})  # 32 channels per block > 8 per group
    poisoned = xv.clone(memory_format=torch.channels_last)
    poisoned[:, cin_g:] = float("nan")  # group 1 is NaN: computing group 0 must not see it
    out = torch.full_like(yv, float("nan"))
    grouped_conv2d_fwd(poisoned, aligned_nan_nhwc(w), None, out, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                       groups=g, config=cfg, tma=True)  # fmt: skip
    assert_close(out[:, :cout_g], y_ref[:, :cout_g], dtype, reduction=9 * cin_g, what="group 0")
    grouped_conv2d_fwd(xv, aligned_nan_nhwc(w), None, yv, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=g,
                       config=cfg, tma=True)  # fmt: skip
    assert_no_oob(y, "forward")
    assert_close(yv, y_ref, dtype, reduction=9 * cin_g, what="forward")


def _geom(x: Tensor, w: Tensor, stride=(1, 1), groups=2) -> common.ConvGeometry:
    return common.ConvGeometry.of(x.shape, w.shape, stride, (1, 1), (1, 1), groups)


def test_shapes_that_do_not_qualify_are_refused_with_a_reason():
    cl = torch.channels_last
    x = torch.zeros(2, 16, 5, 5, dtype=torch.float16).contiguous(memory_format=cl)
    w = torch.zeros(16, 8, 3, 3, dtype=torch.float16).contiguous(memory_format=cl)
    assert tma.why_not_tma(_geom(x, w), "fwd", "ieee", x=x, weight=w) is None
    assert tma.why_not_tma(_geom(x, w), "bwd_input", "ieee", grad_out=x, weight=w, relu_output=None) is None
    wide = torch.zeros(1, 16, 2, 16, dtype=torch.float16).contiguous(memory_format=cl)
    assert tma.why_not_tma(_geom(wide, w), "bwd_weight", "ieee", x=wide, grad_out=wide) is None
    geom = _geom(x, w)
    refusals = {
        "stride": tma.why_not_tma(_geom(x, w, stride=(2, 1)), "fwd", "ieee", x=x, weight=w),
        "dtype": tma.why_not_tma(geom, "fwd", "ieee", x=x.double(), weight=w.double()),
        "ieee": tma.why_not_tma(geom, "fwd", "ieee", x=x.float(), weight=w.float()),
        "nchw x": tma.why_not_tma(geom, "fwd", "ieee", x=x.contiguous(), weight=w),
        "nchw weight": tma.why_not_tma(geom, "fwd", "ieee", x=x, weight=w.contiguous()),
        "12 channels": tma.why_not_tma(
            common.ConvGeometry.of((1, 24, 4, 4), (16, 12, 3, 3), (1, 1), (1, 1), (1, 1), 2), "fwd", "ieee",
            x=torch.zeros(1, 24, 4, 4, dtype=torch.float16).contiguous(memory_format=cl),
            weight=torch.zeros(16, 12, 3, 3, dtype=torch.float16).contiguous(memory_format=cl)),
        "misaligned": tma.why_not_tma(geom, "fwd", "ieee", weight=w, x=torch.zeros(
            2 * 16 * 25 + 1, dtype=torch.float16)[1:].view(2, 5, 5, 16).permute(TO_NCHW)),
        "row stride": tma.why_not_tma(geom, "fwd", "ieee", weight=w,
                                      x=torch.zeros(2, 5, 5, 17, dtype=torch.float16)[..., :16].permute(TO_NCHW)),
        "stride-0 grad": tma.why_not_tma(geom, "bwd_input", "ieee", grad_out=torch.zeros(()).half().expand(2, 16, 5, 5),
                                         weight=w),
        "narrow rows": tma.why_not_tma(geom, "bwd_weight", "ieee", x=x, grad_out=x),
    }  # fmt: skip
    for name, why in refusals.items():
        assert why is not None, name
    assert "stride (2, 1)" in refusals["stride"] and "channels per group" in refusals["12 channels"]
    assert "16-pixel segments" in refusals["narrow rows"]
    # (an NCHW operand is no refusal at the launchers: they copy it to channels_last first; a misaligned
    # channels_last view stays as it is, and is refused)
    misaligned = torch.zeros(2 * 16 * 25 + 1, dtype=torch.float16)[1:].view(2, 5, 5, 16).permute(TO_NCHW)
    with pytest.raises(ValueError, match="tma=True, but "):
        grouped_conv2d_fwd(misaligned, w, None, torch.empty(2, 16, 5, 5, dtype=torch.float16), stride=(1, 1),
                           padding=(1, 1), dilation=(1, 1), groups=2, tma=True)  # fmt: skip
    with pytest.raises(ValueError, match="tma=True, but stride"):
        grouped_conv2d_bwd_input(torch.zeros(2, 16, 3, 3, dtype=torch.float16), w, torch.zeros_like(x),
                                 stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2, tma=True)  # fmt: skip
    with pytest.raises(ValueError, match="tma=True, but the BN"):
        grouped_conv2d_fwd(x, w, None, torch.empty_like(x), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2,
                           pre_scale=torch.ones(16), pre_shift=torch.zeros(16), tma=True)  # fmt: skip


def test_automatic_choice_never_picks_tma_off_sm90(monkeypatch):
    """Under the interpreter (and on CPU) qualifying operands still run the cp.async kernels."""
    assert not tma.use_tma(torch.device("cpu"))
    monkeypatch.setattr(tma, "grouped_conv2d_fwd_tma", _fail)
    monkeypatch.setattr(tma, "grouped_conv2d_bwd_input_tma", _fail)
    x = torch.randn(1, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    y = grouped_conv2d(x, w, branches=2, padding=1, input_precision="tf32")
    assert_close(y, F.conv2d(x.double(), w.double(), padding=1, groups=2), torch.float32, reduction=36, what="y")


def test_a_fixed_config_keeps_the_cp_async_kernel(monkeypatch):
    """A launch with a fixed config (its tile names are one kernel's: the cp.async weight gradient's BLOCK_R) runs the
    cp.async kernels even where TMA would be chosen."""
    monkeypatch.setattr(tma, "use_tma", lambda device: True)
    for name in ("grouped_conv2d_fwd_tma", "grouped_conv2d_bwd_input_tma", "grouped_conv2d_bwd_weight_tma"):
        monkeypatch.setattr(tma, name, _fail)
    x = torch.randn(1, 8, 2, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, input_precision="tf32")
    mnk = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
    grouped_conv2d_fwd(x, w, None, torch.empty_like(x), config=mnk, **conv)
    grouped_conv2d_bwd_input(x, w, torch.empty_like(x), config=mnk, **conv)
    grouped_conv2d_bwd_weight(x, x, torch.empty_like(w), None, config=triton.Config(
        {"BLOCK_CO": 16, "BLOCK_CI": 16, "BLOCK_R": 16}), **conv)


def _fail(*args, **kwargs):
    raise AssertionError("the TMA kernel ran")


@pytest.mark.parametrize("x_channels_last", [True, False])
def test_autograd_on_a_capability_9_device_runs_tma_where_it_qualifies(monkeypatch, x_channels_last):
    """With the device check forced on, the public op's three passes go to the TMA kernels for channels_last tf32
    operands, NCHW ones included (the launchers copy them to channels_last first); values and gradients match
    float64 torch, and the gradients keep the layout of their tensors."""
    calls = []
    for name in ("grouped_conv2d_fwd_tma", "grouped_conv2d_bwd_input_tma", "grouped_conv2d_bwd_weight_tma"):
        real = getattr(tma, name)
        monkeypatch.setattr(tma, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    monkeypatch.setattr(tma, "use_tma", lambda device: True)
    fmt = torch.channels_last if x_channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 3, 16, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(16, 4, 3, 3, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(16, generator=gen, requires_grad=True)
    y = grouped_conv2d(x, w, b, branches=2, padding=1, activation="relu", input_precision="tf32")
    (y * y).sum().backward()
    tma_calls = ["grouped_conv2d_fwd_tma", "grouped_conv2d_bwd_input_tma", "grouped_conv2d_bwd_weight_tma"]
    assert calls == tma_calls
    refs = float64_leaves(x, w, b)
    y_ref = F.conv2d(*refs, padding=1, groups=2).relu()
    (y_ref * y_ref).sum().backward()
    assert_close(y, y_ref, torch.float32, reduction=36, what="forward")
    for name, t, ref, reduction in zip(("dx", "dw", "db"), (x, w, b), refs, (72, 96, 96)):
        assert_close(t.grad, ref.grad, torch.float32, reduction=reduction, what=name)
    assert x.grad.is_contiguous(memory_format=fmt) and y.is_contiguous(memory_format=fmt)


def test_deterministic_algorithms_pin_the_launch_config(monkeypatch):
    seen = []
    monkeypatch.setattr(tma, "launch", lambda kernel, grid, args, constexprs, config: seen.append(config))
    x = torch.zeros(1, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    kwargs = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, input_precision="tf32", tma=True)
    grouped_conv2d_fwd(x, w, None, torch.empty_like(x), **kwargs)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grouped_conv2d_fwd(x, w, None, torch.empty_like(x), **kwargs)
        grouped_conv2d_bwd_input(x, w, torch.empty_like(x), **kwargs)
        wide = torch.zeros(1, 8, 2, 16).contiguous(memory_format=torch.channels_last)
        grouped_conv2d_bwd_weight(wide, wide, torch.empty_like(w), None, **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen[0] is None and all(c is not None for c in seen[1:]) and len(seen) == 4
    assert set(seen[3].kwargs) == {"BLOCK_CO", "BLOCK_CI"}


def test_gpu_config_rules():
    """Every sm_90 config: power-of-two tiles (the pixel box is carved out of BLOCK_M), BLOCK_M a multiple of 64
    with 4 warps per 64 rows (wgmma), BLOCK_K of at least 16 bytes (TMA's inner box), and the pinned rule picks
    from the operand type's list. The spatial tile divides every BLOCK_M and fits the image."""
    for dtype, configs in (("bf16", tma.TMA_CONFIGS_16BIT), ("fp32", tma.TMA_CONFIGS_32BIT)):
        assert tma.tma_configs(dtype) is configs
        for c in configs:
            bm, bn, bk = (c.kwargs[k] for k in common.MNK_BLOCKS)
            assert all(v & (v - 1) == 0 for v in (bm, bn, bk)) and bm % 64 == 0 and c.num_warps == 4 * bm // 64
            assert bk * (4 if dtype == "fp32" else 2) >= 16
    for oh, ow in ((32, 32), (16, 16), (8, 8), (7, 5), (1, 1), (3, 200)):
        th, tw = tma.spatial_tile(oh, ow, 64)
        assert 64 % (th * tw) == 0 and th <= triton.next_power_of_2(oh) and tw <= triton.next_power_of_2(ow)
    assert tma.spatial_tile(32, 32, 128) == (2, 32) and tma.spatial_tile(8, 8, 128) == (8, 8)


def test_autotune_keys_name_precision_groups_kernel_size_and_dilation():
    for tuner in (tma._fwd_tma_autotuned, tma._bwd_input_tma_autotuned, tma._bwd_weight_tma_autotuned):
        tile = {"SEG_W"} if tuner is tma._bwd_weight_tma_autotuned else {"TILE_H", "TILE_W"}
        assert {"G", "KH", "KW", "dil_h", "dil_w", "INPUT_PRECISION", "DOT_DTYPE", *tile} <= set(tuner.keys)
        assert "NB" not in tuner.keys  # the batch does not retune


def test_compile_specs_cover_every_qualifying_stride1_layer():
    """The report builds (``launch_cases``, listed without compiling in a subprocess without the interpreter): the
    passes of every stride-1 channels_last layer of the split WRN-28-10 / ResNet-56 whose channels meet the 16-byte
    rule (the weight gradient: rows of 16 pixels or more), per tensor-core dtype, for sm_90 only, with the operand
    type's configs; fp32-ieee layers have none."""
    import json
    import os
    import subprocess
    import sys

    from groupnet.kernels import _launch_shapes

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "groupnet.kernels.report", "--list", "--json", "--capabilities", "90", "--modules",
         "grouped_conv2d_tma"], capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    specs = json.loads(lines[-1])["specs"]
    covered = {case for s in specs for case in s["cases"]}
    for dtype, variant, size in (("bf16", "bf16", 2), ("fp16", "fp16", 2), ("fp32", "fp32_tf32", 4)):
        for s in _launch_shapes.CONV_SHAPES:
            where = f"{variant} channels_last {s.model}/K{s.branches} {s.cin}->{s.cout} k{s.kernel}s1 {s.size}px"
            qualifies = s.stride == 1 and (s.cin * size) % 16 == 0 and (s.cout * size) % 16 == 0
            assert (f"fwd {where}" in covered) == qualifies, where
            assert (f"bwd_input {where}" in covered) == (qualifies and s.cin != 3), where
            assert (f"bwd_weight {where}" in covered) == (qualifies and s.size >= tma.MIN_SEGMENT), where
        allowed = {tuple(str(v) for v in c.kwargs.values()) for c in tma.tma_configs(dtype) + tma.wg_configs(dtype)}
        for s in (s for s in specs if s["variant"] == variant):
            blocks = common.MNK_BLOCKS if s["pass_name"] != "bwd_weight" else tma.WG_BLOCKS
            assert tuple(s["constexprs"][k] for k in blocks) in allowed, s["name"]
    assert not any("fp32_ieee" in case for case in covered)
    assert {s["pass_name"] for s in specs} == {"fwd", "bwd_input", "bwd_weight"}
    assert tma.Sm90LaunchSpec.capabilities == (90,)  # the report builds them for sm_90 only
