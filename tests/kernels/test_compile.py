"""Offline GPU compilation of the real launches of every kernel module (``compile_specs()``) for sm_80 and sm_90.

The session runs with TRITON_INTERPRET=1 (tests/conftest.py), under which kernels cannot be compiled, so the work
runs in a subprocess, ``python -m groupnet.kernels.report --check --json --subset ci``, without the variable and with
a fresh TRITON_CACHE_DIR. The CI subset compiles, per kernel pass x dtype x layout and arch, the JIT specialization that most real launches
share, with its largest tile config; the full check (every specialization and config, both archs) is
``python -m groupnet.kernels.report --check`` (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from groupnet.kernels import report
from groupnet.kernels._common import SHARED_MEMORY_LIMIT, CompileSpec


def run_report(tmp_path_factory, *args: str) -> dict:
    """``python -m groupnet.kernels.report *args --json`` without the interpreter; its JSON and exit status."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    run = subprocess.run(
        [sys.executable, "-m", "groupnet.kernels.report", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"report printed no JSON (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(lines[-1])
    result["returncode"] = run.returncode
    return result


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    return run_report(tmp_path_factory, "--check", "--subset", "ci")


@pytest.mark.slow
def test_every_kernel_module_is_compiled(compile_report):
    expected = report.modules_with("compile_specs")
    assert "groupnet.kernels.grouped_gemm" in expected
    assert compile_report["modules"] == expected
    compiled = {r["module"] for r in compile_report["results"]}
    assert compiled == {m.rsplit(".", 1)[-1] for m in expected}
    sm90_only = set()
    for module in expected:
        short = module.rsplit(".", 1)[-1]
        # a module's spec class may name the targets its kernels run on (the TMA GEMM: sm_90 only)
        declared = [set(c.capabilities) for c in vars(importlib.import_module(module)).values()
                    if isinstance(c, type) and issubclass(c, CompileSpec) and hasattr(c, "capabilities")]
        targets = set().union(*declared) if declared else {80, 90}
        if targets == {90}:
            sm90_only.add(short)
        for capability in targets:
            assert any(r["module"] == short and r["capability"] == capability for r in compile_report["results"])
    # every pass x dtype x layout of the real launches is built for both archs
    groups = {cc: {(r["module"], r["pass_name"], r["variant"], r["layout"]) for r in compile_report["results"]
                   if r["capability"] == cc} for cc in (80, 90)}  # fmt: skip
    assert groups[80] == {g for g in groups[90] if g[0] not in sm90_only}
    conv = {g for g in groups[90] if g[0] == "grouped_conv2d"}
    # passes x (bf16, fp16, fp32 tf32, fp32 ieee), channels_last only: NCHW launches copy to channels_last first
    assert len(conv) == 3 * 4 and {g[3] for g in conv} == {"channels_last"}, sorted(conv)
    assert len({g for g in groups[90] if g[0] == "grouped_gemm"}) == 3 * 4


@pytest.mark.slow
def test_real_launches_pass_the_check_or_are_expected_failures(compile_report):
    failures = compile_report["failures"]
    assert not failures, "\n".join(failures)
    assert compile_report["returncode"] == 0
    for r in compile_report["results"]:  # the same checks, spelled out, in case failures_of ever drifts
        where = f"{r['module']}:{r['name']} sm_{r['capability']}"
        assert r["error"] is None, f"{where}: {r['error']}"
        assert r["shared"] <= SHARED_MEMORY_LIMIT[r["capability"]], f"{where}: shared memory {r['shared']} B"
        excused = {check for check, _ in report._check_failures(r) if report.expected_failure_of(r, check)}
        if "spills" not in excused:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: spills with {r['registers']} regs"
        if "registers" not in excused and r["num_warps"] >= 8:
            assert r["registers"] <= report.MAX_REGISTERS_8_WARPS, f"{where}: {r['registers']} registers"
        if "wgmma" not in excused and r["capability"] == 90 and r["dot_dtype"] in ("fp16", "bf16"):
            assert r["wgmma"], f"{where}: 16-bit tl.dot without wgmma"
        if "async_copy" not in excused and r["has_dot"]:
            # operand tiles: none loaded synchronously in the loop, every 2-d copy 16 B; a narrower PTX copy is one
            # of the 1-d vector copies (per-channel scale/shift), never a tile
            assert r["loop_sync_tile_loads"] == 0 and set(r["tile_copy_bytes"]) <= {"16"}, where
            assert set(r["cp_async"]) - {"16"} <= set(r["vector_copy_bytes"]), where
            assert r["tma"] or r["cp_async"].get("16"), where


def test_roofline_estimates_cover_the_split_wrn_classifier():
    from groupnet.roofline import roofline_rows

    rows = [r for r in roofline_rows(only=["grouped_gemm"]) if r["module"] == "grouped_gemm"]
    assert {r["name"].split(" ")[0] for r in rows} == {"forward", "backward_input", "backward_weight"}
    for r in rows:
        assert r["roofline_floor_us"] == pytest.approx(max(r["compute_floor_us"], r["memory_floor_us"]))
        assert r["flops"] > 0 and r["bytes"] > 0


def _record(**overrides):
    record = dict(
        module="m", name="k", capability=90, error=None, shared=1024, shared_limit=SHARED_MEMORY_LIMIT[90],
        registers=128, spill_stores=0, spill_loads=0, dot_dtype="fp16", wgmma=True, num_warps=8, has_dot=True,
        cp_async={"16": 8}, tma=0, sync_tile_loads=0, pass_name="fwd", variant="fp16", layout="nchw",
    )  # fmt: skip
    record.update(overrides)
    return record


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(shared=SHARED_MEMORY_LIMIT[90] + 1), "static shared memory"),
        (dict(spill_stores=8), "register spills"),
        (dict(spill_loads=4), "register spills"),
        (dict(wgmma=False), "did not produce wgmma"),
        (dict(error="CompilationError: boom"), "compile error"),
        (dict(registers=report.MAX_REGISTERS_8_WARPS + 1), "registers with 8 warps"),
        (dict(cp_async={}), "16-byte asynchronous"),
        (dict(cp_async={"16": 4, "4": 8}), "16-byte asynchronous"),
        (dict(sync_tile_loads=2), "16-byte asynchronous"),
    ],
)
def test_report_check_flags_each_failure(overrides, reason):
    assert report.failures_of(_record(), table=[]) == []
    assert report.failures_of(_record(cp_async={}, tma=2), table=[]) == []  # TMA is an asynchronous 16-byte path
    assert report.failures_of(_record(registers=255, num_warps=4), table=[]) == []  # the ceiling is for 8 warps
    assert report.failures_of(_record(cp_async={}, has_dot=False), table=[]) == []  # no dot: no operand rule
    sm80 = _record(wgmma=False, capability=80, shared_limit=SHARED_MEMORY_LIMIT[80])
    assert report.failures_of(sm80, table=[]) == []
    failures = report.failures_of(_record(**overrides), table=[])
    assert len(failures) == 1 and reason in failures[0]


def test_expected_failures_excuse_only_their_rows():
    row = report.ExpectedFailure("m", "fwd", "nchw", "async_copy", "NCHW gathers")
    failing = _record(sync_tile_loads=2)
    assert report.failures_of(failing, table=[row]) == []
    assert "NCHW gathers" in report.expected_failures_of(failing, table=[row])[0]
    for other in (dict(layout="channels_last"), dict(pass_name="bwd_input"), dict(module="n")):
        assert len(report.failures_of(_record(sync_tile_loads=2, **other), table=[row])) == 1
    assert len(report.failures_of(_record(sync_tile_loads=2, spill_stores=4), table=[row])) == 1  # other check
    assert len(report.failures_of(_record(error="boom"), table=[row])) == 1  # compile errors are never expected
    # a row whose builds all pass is stale; one whose builds were not compiled is not judged
    assert report.stale_expected_failures([_record()], table=[row]) == [row]
    assert report.stale_expected_failures([failing], table=[row]) == []
    assert report.stale_expected_failures([_record(module="n")], table=[row]) == []


def test_a_narrow_only_row_does_not_excuse_gathers():
    """A row for narrow tile copies excuses a build whose tiles are all asynchronous with some 16 B, not one that
    loads a tile synchronously (a gather, e.g. channels not divisible by 8) under the same tile size."""
    row = report.ExpectedFailure("m", "fwd", "*", "async_copy", "narrow weight tile", narrow_only=True)
    narrow = _record(loop_sync_tile_loads=0, tile_copy_bytes={"16": 4, "4": 4}, vector_copy_bytes={},
                     cp_async={"16": 8, "4": 8})
    gather = _record(loop_sync_tile_loads=2, tile_copy_bytes={}, vector_copy_bytes={}, cp_async={})
    assert report.failures_of(narrow, table=[]) and report.failures_of(narrow, table=[row]) == []
    assert report.failures_of(gather, table=[row])


_LOOP_SASS = """
        /*0100*/                   STL [R1], R5 ;
        /*0110*/               @!P0 BRA 0x0200 ;
        /*0120*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0130*/                   {inside} ;
        /*0140*/               @P0 BRA 0x0120 ;
        /*0150*/                   LDL.LU R5, [R1] ;
        /*0200*/                   EXIT ;
        /*0210*/                   BRA 0x0210;
"""


def test_spill_instructions_are_located_inside_or_outside_the_loops():
    """A spill stored before the loop and reloaded after it is outside every loop (0); one between a backward
    branch's target and the branch is inside; an unreadable branch target gives None."""
    assert report.local_memory_ops_in_loops(_LOOP_SASS.format(inside="FFMA R4, R4, R4, R4")) == 0
    assert report.local_memory_ops_in_loops(_LOOP_SASS.format(inside="LDL R7, [R1+0x4]")) == 1
    assert report.local_memory_ops_in_loops(_LOOP_SASS.format(inside="STL.64 [R1+0x8], R6")) == 1
    assert report.local_memory_ops_in_loops("        /*0010*/   @P0 BRA `(.L_x_1) ;") is None


def test_a_spills_outside_loops_row_excuses_only_spills_outside_loops():
    row = report.ExpectedFailure("m", "*", "*", "spills", "outside the loop", spills_outside_loops=True)
    outside = _record(spill_stores=4, spill_loads=4, sass={"STL": 1, "LDL": 1, "LOCAL_IN_LOOPS": 0})
    inside = _record(spill_stores=4, spill_loads=4, sass={"STL": 1, "LDL": 1, "LOCAL_IN_LOOPS": 1})
    unknown = _record(spill_stores=4, spill_loads=4, sass={"STL": 1, "LDL": 1})
    assert report.failures_of(outside, table=[]) and report.failures_of(outside, table=[row]) == []
    assert report.failures_of(inside, table=[row]) and report.failures_of(unknown, table=[row])


def test_expected_failure_rows_name_real_kernels_and_checks():
    modules = {m.rsplit(".", 1)[-1] for m in report.modules_with("compile_specs")}
    for row in report.EXPECTED_FAILURES:
        assert row.module in modules, row
        assert row.check in ("async_copy", "registers", "spills", "wgmma", "shared"), row
        assert row.layout in ("*", "nchw", "channels_last", "-"), row
        assert row.reason, row


def test_report_refuses_to_run_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(SystemExit):
        report.main(["--check"])


def test_ptx_loads_reads_async_copy_sizes_tma_and_synchronous_tiles():
    ptx = (
        "\tcp.async.cg.shared.global [ %r94 + 0 ], [ %rd70 + 0 ], 0x10, %r92;\n"
        "\t@%p1 cp.async.ca.shared.global [ %r9 + 0 ], [ %rd7 + 0 ], 0x4, %r2;\n"
        "\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2}], [%r4];\n"
        "\t@%p3 ld.global.b16 { %rs9 }, [ %rd9 + 0 ];\n"
        "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
    )
    ttgir = (
        "%a = ttg.async_copy_global_to_local %p, %s mask %m : tensor<128x32x!tt.ptr<bf16>, #b> -> <...>\n"
        "%b = tt.load %q, %m2 : tensor<32x128x!tt.ptr<bf16>, #b>\n"
        "%c = tt.load %bias : tensor<128x!tt.ptr<bf16>, #s>\n"
    )
    loads = report.ptx_loads(ptx, ttgir)
    assert loads == {"cp_async": {"16": 1, "4": 1}, "tma": 1, "ld_global": {"2": 1, "16": 1},
                     "sync_tile_loads": 1, "async_tile_copies": 1, "loop_sync_tile_loads": 0,
                     "tile_copy_bytes": {"2": 1}, "vector_copy_bytes": {}}


def test_ttgir_copies_judge_the_operand_tiles_of_the_loop():
    """Inside the loop: a synchronous 2-d tile load counts, copies are sized by their contiguity; after the loop (an
    epilogue's residual tile) a load is no operand; 1-d copies (per-channel vectors) are kept apart."""
    ttgir = (
        "  tt.func @k() {\n"
        "    %x0 = ttg.async_copy_global_to_local %p, %s mask %m other %c {contiguity = 8 : i32} : "
        "tensor<64x32x!tt.ptr<f16>, #blocked> -> <64x32xf16, #shared, #smem, mutable>\n"
        "    %r:3 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<64x64xf32, #mma>) {\n"
        "      %x = ttg.async_copy_global_to_local %p, %s mask %m other %c {contiguity = 8 : i32} : "
        "tensor<64x32x!tt.ptr<f16>, #blocked> -> <64x32xf16, #shared, #smem, mutable>\n"
        "      %w = ttg.async_copy_global_to_local %q, %t mask %m other %c {contiguity = 2 : i32} : "
        "tensor<16x16x!tt.ptr<f32>, #blocked1> -> <16x16xf32, #shared1, #smem, mutable>\n"
        "      %v = ttg.async_copy_global_to_local %u, %t mask %k other %c : tensor<32x!tt.ptr<f32>, #blocked3> -> "
        "<32xf32, #shared2, #smem, mutable>\n"
        "      %y = tt.load %ptrs, %mask : tensor<64x32x!tt.ptr<f16>, #blocked>\n"
        "      scf.yield %a : tensor<64x64xf32, #mma>\n"
        "    } loc(#loc1)\n"
        "    %res = tt.load %rp, %rm : tensor<64x64x!tt.ptr<f16>, #blocked1>\n"
        "  }\n"
    )
    assert report.ttgir_copies(ttgir) == {"loop_sync_tile_loads": 1, "tile_copy_bytes": {"16": 2, "8": 1},
                                          "vector_copy_bytes": {"4": 1}}


@pytest.mark.parametrize(
    "overrides, fails",
    [
        (dict(), False),
        (dict(cp_async={"16": 8, "4": 2}, vector_copy_bytes={"4": 2}), False),  # 1-d per-channel vectors
        (dict(cp_async={"16": 8, "4": 2}), True),  # a narrow PTX copy no 1-d copy explains
        (dict(tile_copy_bytes={"16": 4, "4": 2}, cp_async={"16": 8, "4": 2}), True),  # a narrow 2-d tile
        (dict(loop_sync_tile_loads=1), True),  # an operand tile loaded synchronously in the loop
        (dict(sync_tile_loads=1), False),  # a tile loaded after the loop (the epilogue's residual)
    ],
)
def test_async_copy_check_reads_the_operand_tiles(overrides, fails):
    ttgir_fields = dict(loop_sync_tile_loads=0, tile_copy_bytes={"16": 4}, vector_copy_bytes={})
    record = _record(**{**ttgir_fields, **overrides})
    assert bool(report.failures_of(record, table=[])) == fails


def test_sass_summary_groups_builds_and_labels_the_estimate(capsys):
    hgmma = dict(sass={"LDGSTS": 8, "LDGSTS.128": 8, "HGMMA": 4}, registers=120)
    gather = dict(sass={"LDG": 32, "LDG.U16": 32, "HMMA": 16}, registers=200, sync_tile_loads=2)
    results = [_record(**hgmma), _record(**hgmma, layout="channels_last"), _record(**gather),
               _record(**gather, capability=80)]
    rows = report.sass_summary(results)
    assert [(r["layout"], r["builds"]) for r in rows] == [("channels_last", 1), ("nchw", 2)]
    nchw = rows[1]
    assert nchw["registers"] == "120-200"
    assert nchw["loads"] == "LDGSTS.128 1/2; LDG <= 8 B (gathers) 1/2"
    assert nchw["mma"] == "HGMMA 1/2; HMMA 1/2"
    best = report.MMA_CEILING["HGMMA"] * report.LOAD_CEILING["LDGSTS.128"]
    worst = report.MMA_CEILING["HMMA"] * report.GATHER_CEILING
    assert nchw["est_fraction"] == pytest.approx((best + worst) / 2)
    report.print_sass_summary(rows, markdown=True)
    out = capsys.readouterr().out
    assert "ESTIMATES" in out and "| kernel | pass | dtype | layout |" in out


def test_expected_failures_can_name_the_launches():
    stem = report.ExpectedFailure("m", "fwd", "nchw", "async_copy", "3 channels", where=" 3->")
    assert report.failures_of(_record(sync_tile_loads=1, labels=["fwd bf16 nchw wrn/K2 3->16 k3s1"]), [stem]) == []
    assert len(report.failures_of(_record(sync_tile_loads=1, labels=["fwd bf16 nchw wrn/K2 16->112 k3s1"]),
                                  [stem])) == 1


def test_a_worker_compiling_another_spec_stops_the_check(monkeypatch):
    """When the kernel modules change while a check runs, a worker's spec at an index is not the parent's: the
    report stops with a message naming both instead of recording the wrong build under that job."""
    from types import SimpleNamespace

    specs = [SimpleNamespace(name="spec_a"), SimpleNamespace(name="spec_b")]
    monkeypatch.setitem(sys.modules, "kernels_under_check", SimpleNamespace(compile_specs=lambda: specs))
    jobs = [("kernels_under_check", 0, 90), ("kernels_under_check", 1, 80)]
    monkeypatch.setattr(report, "_compile_one", lambda job: {"name": specs[job[1]].name})
    assert report.run_compile_jobs(jobs, 1) == [{"name": "spec_a"}, {"name": "spec_b"}]
    monkeypatch.setattr(report, "_compile_one", lambda job: {"name": specs[-1 - job[1]].name})
    with pytest.raises(RuntimeError, match=r"spec 0 of kernels_under_check \(sm_90\) is spec_a here, but the worker "
                                           r"compiled spec_b: the kernel modules changed"):
        report.run_compile_jobs(jobs, 1)
