"""benchmarks/gpu_kernels.py's comparison table, built from fake timings on the CPU (the timings need a GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_kernels_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_peaks_follow_the_device_name(bench):
    assert bench.device_peaks("NVIDIA H100 80GB HBM3") == ("H100", bench.DEVICE_PEAKS["H100"])
    assert bench.device_peaks("NVIDIA H200") == ("H200", bench.DEVICE_PEAKS["H200"])
    assert bench.device_peaks("NVIDIA A100-SXM4-80GB") is None
    assert bench.DEVICE_PEAKS["H100"] == {"bf16": 989e12, "tf32": 494e12, "hbm": 3.35e12}
    assert bench.DEVICE_PEAKS["H200"]["hbm"] == 4.8e12


def test_conv_costs_count_flops_and_bytes_of_each_pass(bench):
    costs = bench.conv_costs(2, 4, 16, 32, 3, 2, 8, elem=2)  # K=2, N=4, 16->32, 3x3 stride 2, 8x8 -> 4x4
    flops = 2 * 4 * 4 * 4 * 2 * 32 * 16 * 9
    elements = 4 * 2 * 16 * 64 + 4 * 2 * 32 * 16 + 2 * 32 * 16 * 9
    assert set(costs) == set(bench.PASSES)
    assert all(c.flops == flops and c.bytes == 2 * elements for c in costs.values())


def test_roofline_percent_is_the_larger_floor_over_the_time(bench):
    peaks = bench.DEVICE_PEAKS["H100"]
    compute_bound = bench.PassCost(flops=989e12 * 1e-3, bytes=1.0)  # 1 ms of bf16 compute, no traffic
    assert bench.roofline_percent(compute_bound, 2.0, "bf16", peaks) == pytest.approx(50.0)
    assert bench.roofline_percent(compute_bound, 2.0, "tf32", peaks) == pytest.approx(100.0 * 989 / 494 / 2)
    memory_bound = bench.PassCost(flops=1.0, bytes=3.35e12 * 1e-3)  # 1 ms of HBM traffic
    assert bench.roofline_percent(memory_bound, 4.0, "bf16", peaks) == pytest.approx(25.0)
    assert bench.roofline_percent(memory_bound, 4.0, "bf16", None) is None


def test_table_has_one_line_per_pass_and_a_column_per_implementation(bench):
    peaks = bench.DEVICE_PEAKS["H100"]
    cost = bench.PassCost(flops=989e12 * 1e-3, bytes=1.0)
    rows = []
    for pass_name in bench.PASSES:
        for i, impl in enumerate(bench.IMPLS):
            if pass_name == "weight grad" and impl == bench.IMPLS[2]:
                continue  # a missing timing
            rows.append({"op": "conv", "shape": "s", "dtype": "bf16", "pass": pass_name, "impl": impl,
                         "ms": 1.0 + i, "flops": cost.flops, "bytes": cost.bytes})
    table = bench.build_table(rows, "NVIDIA H100 80GB HBM3", peaks)
    lines = table.splitlines()
    assert "989 TFLOP/s" in lines[0] and "HBM 3.35 TB/s" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["op", "shape", "dtype", "pass", *bench.IMPLS, "triton / cuDNN grouped"]
    assert lines[3].count("---") == len(header)
    body = lines[4:]
    assert [line.split("|")[4].strip() for line in body] == list(bench.PASSES)
    first = [c.strip() for c in body[0].strip("|").split("|")]
    assert first[4:] == ["1.0000 (100%)", "2.0000 (50%)", "3.0000 (33%)", "4.0000 (25%)", "2.00x"]
    assert [c.strip() for c in body[2].strip("|").split("|")][6] == "-"
    assert "%" not in bench.build_table(rows, "unknown GPU", None).split("\n", 3)[3]


def test_without_cuda_the_table_mode_fails_with_one_line():
    run = subprocess.run([sys.executable, str(SCRIPT), "--table"], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in run.stderr
