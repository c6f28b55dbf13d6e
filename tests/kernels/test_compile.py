"""Offline GPU compilation of every kernel module's ``compile_specs()`` for sm_80 and sm_90 (no GPU needed).

The session runs with TRITON_INTERPRET=1 (tests/conftest.py), under which kernels cannot be compiled, so the work
runs in a subprocess, ``python -m groupnet.kernels.report --check --json``, without the variable and with a fresh
TRITON_CACHE_DIR. sm_90 compiles every spec; sm_80 compiles one spec per kernel variant, the one with the largest
tiles (``--sm80 subset``), to keep the test within a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from groupnet.kernels import report
from groupnet.kernels._common import SHARED_MEMORY_LIMIT


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    run = subprocess.run(
        [sys.executable, "-m", "groupnet.kernels.report", "--check", "--json", "--sm80", "subset"],
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


@pytest.mark.slow
def test_every_kernel_module_is_compiled(compile_report):
    expected = report.modules_with("compile_specs")
    assert "groupnet.kernels.grouped_gemm" in expected
    assert compile_report["modules"] == expected
    compiled = {r["module"] for r in compile_report["results"]}
    assert compiled == {m.rsplit(".", 1)[-1] for m in expected}
    for module in expected:
        short = module.rsplit(".", 1)[-1]
        n_specs = len(__import__(module, fromlist=["compile_specs"]).compile_specs())
        sm90 = [r for r in compile_report["results"] if r["module"] == short and r["capability"] == 90]
        assert len(sm90) == n_specs, f"{short}: {len(sm90)} of {n_specs} specs compiled for sm_90"
        assert any(r["module"] == short and r["capability"] == 80 for r in compile_report["results"])


@pytest.mark.slow
def test_specs_fit_shared_memory_without_spills_and_use_wgmma(compile_report):
    failures = compile_report["failures"]
    assert not failures, "\n".join(failures)
    assert compile_report["returncode"] == 0
    for r in compile_report["results"]:  # the same checks, spelled out, in case failures_of ever drifts
        where = f"{r['module']}:{r['name']} sm_{r['capability']}"
        assert r["error"] is None, f"{where}: {r['error']}"
        assert r["shared"] <= SHARED_MEMORY_LIMIT[r["capability"]], f"{where}: shared memory {r['shared']} B"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: spills with {r['registers']} registers"
        if r["capability"] == 90 and r["dot_dtype"] in ("fp16", "bf16"):
            assert r["wgmma"], f"{where}: 16-bit tl.dot without wgmma"


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
        registers=128, spill_stores=0, spill_loads=0, dot_dtype="fp16", wgmma=True,
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
    ],
)
def test_report_check_flags_each_failure(overrides, reason):
    assert report.failures_of(_record()) == []
    assert report.failures_of(_record(wgmma=False, capability=80, shared_limit=SHARED_MEMORY_LIMIT[80])) == []
    failures = report.failures_of(_record(**overrides))
    assert len(failures) == 1 and reason in failures[0]


def test_report_refuses_to_run_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(SystemExit):
        report.main(["--check"])
