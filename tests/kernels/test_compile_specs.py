"""The compile specs are the JIT's own specializations of real launches (kernels/_common.py: specs_from_launches).

Structure only, no compile (that is tests/kernels/test_compile.py): the listing runs in a subprocess without
TRITON_INTERPRET (``python -m groupnet.kernels.report --list --json``), since the interpreter replaces the JIT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from groupnet.kernels import _launch_shapes
from groupnet.kernels._common import (
    ALLOCATION_ALIGNMENT,
    CompileSpec,
    _PointerArg,
    capture_launches,
    multiprocessor_count,
)


@pytest.fixture(scope="module")
def listing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "groupnet.kernels.report", "--list", "--json", "--capabilities", "90"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return json.loads(lines[-1])["specs"]


def _specs(listing, module, pass_name=None):
    return [s for s in listing if s["module"] == module and pass_name in (None, s["pass_name"])]


def _divisible(spec) -> set[str]:
    names = list(spec["signature"])
    return {names[path[0]] for path, attr in spec["attrs"] if ["tt.divisibility", 16] in attr}


def test_launch_shapes_match_the_model_zoo():
    """kernels/_launch_shapes.py lists exactly the grouped convs and classifiers the zoo builds."""
    from groupnet.roofline import model_layer_shapes

    for model, k in {(s.model, s.branches) for s in _launch_shapes.CONV_SHAPES}:
        convs, linears = model_layer_shapes(model, k, num_classes=_launch_shapes.CLASSES, image_size=32)
        listed = [tuple(s[2:]) for s in _launch_shapes.CONV_SHAPES if (s.model, s.branches) == (model, k)]
        assert [tuple(c[1:]) for c in convs] == listed, (model, k)
        assert [tuple(lin[1:]) for lin in linears] == [
            (s.in_features, s.out_features) for s in _launch_shapes.LINEAR_SHAPES if (s.model, s.branches) == (model, k)
        ]


def test_every_real_launch_has_specs(listing):
    covered = {case for s in listing for case in s["cases"]}
    for dtype, precision in _launch_shapes.DTYPE_VARIANTS:
        variant = dtype if dtype != "fp32" else f"fp32_{precision}"
        for layout in _launch_shapes.LAYOUTS:
            for s in _launch_shapes.CONV_SHAPES:
                where = f"{s.model}/K{s.branches} {s.cin}->{s.cout} k{s.kernel}s{s.stride} {s.size}px"
                passes = ("fwd", "bwd_weight") if s.cin == 3 else ("fwd", "bwd_input", "bwd_weight")
                for p in passes:
                    assert f"{p} {variant} {layout} {where}" in covered
            stem = _launch_shapes.CONV_SHAPES[0]  # the stem's input needs no gradient: its bwd_input never runs
            assert not any(c.startswith(f"bwd_input {variant} {layout} {stem.model}/K{stem.branches} 3->")
                           for c in covered)
        for s in _launch_shapes.LINEAR_SHAPES:
            for p in ("forward", "backward_input", "backward_weight"):
                assert f"{p} {variant} {s.model}/K{s.branches} {s.in_features}->{s.out_features} M128" in covered
    assert len({s["name"] for s in listing}) == len(listing)


def test_specs_carry_the_jit_specialization(listing):
    """What the hand-written specs got wrong: the GEMM marks sizes/strides divisible by 16 (cp.async needs it), unit
    strides are constexpr, NCHW launches compile the channels_last builds (the launchers copy NCHW operands to
    channels_last), the stem's 3 channels are not divisible."""
    fwd = [s for s in _specs(listing, "grouped_gemm", "forward") if "wrn-28-10/K2 448->100" in s["cases"][0]]
    assert fwd
    for s in fwd:
        assert {"A", "B", "C", "BIAS", "M", "KD"} <= _divisible(s), _divisible(s)
        assert "N" not in _divisible(s)  # 100 classes
        assert s["signature"]["stride_ak"] == "constexpr" and s["constexprs"]["stride_ak"] == "1"
    convs = _specs(listing, "grouped_conv2d", "fwd")
    cl = [s for s in convs if s["layout"] == "channels_last" and " 112->112 k3s1" in s["cases"][0]]
    assert cl and all(s["signature"]["sx_c"] == "constexpr" for s in cl)  # channel stride 1
    # NCHW launches share the channels_last specs: no spec of any conv module gathers channels
    assert not [s for s in listing if s["module"].startswith("grouped_conv2d") and s["layout"] == "nchw"]
    assert any(" nchw " in label for s in cl for label in s["cases"])
    stem = [s for s in convs if " 3->16 k3s1" in s["cases"][0] and s["layout"] == "channels_last"]
    assert stem and all("CIN_G" not in _divisible(s) for s in stem)
    assert all("COUT_G" in _divisible(s) for s in cl)


def test_1x1_convs_keep_the_channel_alignment(listing):
    """A 1x1 weight's spatial strides are never used (its only tap is 0); in NCHW they are 1, which forced
    CH_ALIGN = 1 and left the stride-2 input gradient's weight tile a synchronous 2-byte gather. The launchers pass
    0 for them, so the 16-byte alignment of the channel counts reaches the compiler."""
    one_by_one = [s for s in _specs(listing, "grouped_conv2d") if s["pass_name"] in ("fwd", "bwd_input")
                  and " 112->224 k1s2" in s["cases"][0] and s["layout"] == "channels_last"]
    assert {s["pass_name"] for s in one_by_one} == {"fwd", "bwd_input"}
    for s in one_by_one:
        assert s["constexprs"]["CH_ALIGN"] == "16", (s["name"], s["constexprs"])
        assert {"sw_h", "sw_w"} <= _divisible(s), (s["name"], _divisible(s))


def test_specs_use_only_the_autotuners_configs(listing):
    """Each spec's tile config is one its autotuner offers (after its pruning): GEMM fp32-ieee builds only the FMA
    configs, the 16-bit builds only the tensor-core ones."""
    from groupnet.kernels import grouped_gemm as gg

    def tiles(cfg):
        return tuple(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))

    for s in _specs(listing, "grouped_gemm"):
        got = tuple(s["constexprs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        dtype, _, precision = s["variant"].partition("_")
        allowed = {tiles(c) for c in gg.gpu_configs(dtype, precision or "ieee")}
        assert got in allowed, (s["name"], got)


def test_capture_records_launches_instead_of_running_them():
    """On meta tensors inside capture_launches a launcher records its arguments (addresses: allocation-aligned
    base plus the view's offset), and launch-time decisions see the assumed SM count."""
    import torch

    from groupnet.kernels import grouped_gemm as gg

    x = torch.empty(8, 2 * 24, device="meta")
    w = torch.empty(2, 5, 24, device="meta")
    with capture_launches() as records:
        gg.forward_into(x, w, None, out=torch.empty(8, 10, device="meta"))
        assert multiprocessor_count(x.device) is not None
    assert multiprocessor_count(x.device) is None
    (kernel, args, constexprs, config), = records
    assert kernel is gg._features_reduced_gemm and config is None and constexprs["HAS_BIAS"] is False
    assert isinstance(args[0], _PointerArg) and args[0].data_ptr() % ALLOCATION_ALIGNMENT == 0
    assert args[4:7] == (8, 5, 24)  # M, N, KD
    view = _PointerArg.of(x[:, 3:])
    assert view.data_ptr() % ALLOCATION_ALIGNMENT == 3 * 4


def test_jit_attrs_replace_the_aligned_pointer_guess():
    spec = CompileSpec(name="k", fn=None, signature={"A": "*fp16"}, jit_attrs=(((1,), (("tt.divisibility", 16),)),))
    assert spec.attrs() == {(1,): [["tt.divisibility", 16]]}


def test_loss_specs_cover_every_kernel_variant_the_trainer_launches(listing):
    """Hard and soft targets, both divergences, with and without the gradient, the three logits dtypes; no dot."""
    specs = [s for s in _specs(listing, "cotrain_loss") if "SOFT_TARGETS" in s["constexprs"] and "BLOCK_S" not in
             s["constexprs"]]  # the one-program-per-sample kernel (the class-split kernels have their own test)
    seen = {key: {s["constexprs"][key] for s in specs} for key in ("SOFT_TARGETS", "DIVERGENCE", "COMPUTE_GRAD")}
    assert seen == {"SOFT_TARGETS": {"False", "True"}, "DIVERGENCE": {"0", "1"}, "COMPUTE_GRAD": {"False", "True"}}
    assert {s["signature"]["logits_ptr"] for s in specs} == {"*fp32", "*fp16", "*bf16"}


def test_loss_specs_include_the_class_split_kernels(listing):
    """Few samples over many classes (N 64, C 32000) take the class-split path: its three kernels are compiled too,
    told apart by their constexprs (statistics: tiles only; divergence partials: BLOCK_S; finish: BLOCK_S and
    COMPUTE_GRAD)."""
    kinds = [set(s["constexprs"]) for s in _specs(listing, "cotrain_loss") if "_C32000_" in s["name"]]
    assert any("SOFT_TARGETS" not in k and {"BLOCK_K", "BLOCK_C", "ACC_DTYPE"} <= k for k in kinds), kinds
    assert any("BLOCK_S" in k and "COMPUTE_GRAD" not in k for k in kinds), kinds
    assert any({"BLOCK_S", "COMPUTE_GRAD"} <= k for k in kinds), kinds
