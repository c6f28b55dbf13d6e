"""groupnet.scaling: the scaling laws hold on the measured counts (within rounding), K-splitting keeps flops and
params and grows acts by sqrt(K), and the CLI writes its table, CSV and PNG."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from groupnet.models import arch_spec
from groupnet.models.resnet import resnet_spec
from groupnet.scaling import (
    NetConfig,
    achieved_factors,
    fast_type,
    main,
    measure,
    measure_time,
    parse_type,
    scale_factors,
    scaled_config,
    scaling_rows,
    write_plot,
)


# Deep and wide enough that rounding depth (per stage), width (to 4) and resolution (to 4) stays within a few percent.
BASE = NetConfig(resnet_spec(110, base_width=64), branches=1, resolution=32)


def ratios(config: NetConfig, base: NetConfig = BASE) -> dict[str, float]:
    a, b = measure(config), measure(base)
    return {n: getattr(a, n) / getattr(b, n) for n in ("flops", "params", "acts")}


def assert_close_ratios(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    for name, value in want.items():
        assert abs(got[name] / value - 1) <= rel, (name, got[name], value)


def test_parse_type_and_factors_multiply_to_s():
    assert parse_type("dwr") == {"d": 1.0, "w": 1.0, "r": 1.0, "k": 0.0}
    assert parse_type("d1_w8_r1") == {"d": 1.0, "w": 8.0, "r": 1.0, "k": 0.0}
    assert parse_type(fast_type(0.8)) == pytest.approx({"d": 0.1, "w": 0.8, "r": 0.1, "k": 0.0})
    for t in ("d", "w", "r", "k", "dwr", "d1_w8_r1", "k1_w1"):
        f = scale_factors(4.0, t)
        assert f["d"] * f["w"] ** 2 * f["r"] ** 2 * f["k"] == pytest.approx(4.0)
    f = scale_factors(4.0, "d1_w8_r1")  # the pycls docstring example: d x1.149, w x1.741, r x1.072
    assert (round(f["d"], 3), round(f["w"], 3), round(f["r"], 3)) == (1.149, 1.741, 1.072)
    with pytest.raises(ValueError, match="bad scaling type"):
        parse_type("x2")
    with pytest.raises(ValueError, match="weight 0"):
        parse_type("d0")


@pytest.mark.parametrize("s", [2.0, 4.0])
def test_width_only(s):
    """params ~ s, acts ~ sqrt(s)."""
    assert_close_ratios(ratios(scaled_config(BASE, "width", s)), {"flops": s, "params": s, "acts": s ** 0.5}, 0.05)


def test_depth_only():
    """params ~ s, acts ~ s."""
    assert_close_ratios(ratios(scaled_config(BASE, "depth", 2.0)), {"flops": 2, "params": 2, "acts": 2}, 0.05)


def test_resolution_only():
    """params ~ 1, acts ~ s."""
    got = ratios(scaled_config(BASE, "resolution", 4.0))
    assert got["params"] == 1.0
    assert_close_ratios(got, {"flops": 4, "acts": 4}, 0.01)


def assert_law_at_achieved_factors(base: NetConfig, cfg: NetConfig, got: dict[str, float]) -> None:
    """The laws flops ~ d w^2 r^2, params ~ d w^2, acts ~ d w r^2 at the factors rounding really gave."""
    f = achieved_factors(base, cfg)
    d, w, r = f["d"], f["w"], f["r"]
    assert_close_ratios(got, {"flops": d * w * w * r * r, "params": d * w * w, "acts": d * w * r * r}, 0.03)


# Resolution 64: rounding it to a multiple of 4 costs < 7%, against 12.5% at 32.
BASE64 = NetConfig(BASE.spec, branches=1, resolution=64)


@pytest.mark.parametrize("s", [4.0, 8.0])
def test_fast_compound_alpha_08(s):
    """params ~ s^0.9, acts ~ s^0.6: exactly the laws at the rounded factors, and near the nominal exponents."""
    cfg = scaled_config(BASE64, "fast", s, alpha=0.8)
    got = ratios(cfg, BASE64)
    assert_law_at_achieved_factors(BASE64, cfg, got)
    assert_close_ratios(got, {"flops": s, "params": s ** 0.9, "acts": s ** 0.6}, 0.10)


def test_uniform_compound_dwr():
    s = 8.0
    cfg = scaled_config(BASE64, "dwr", s)
    got = ratios(cfg, BASE64)
    assert_law_at_achieved_factors(BASE64, cfg, got)
    assert_close_ratios(got, {"flops": s, "params": s ** (2 / 3), "acts": s ** (5 / 6)}, 0.10)


def test_branches_as_a_flops_dimension_scales_everything_by_s():
    cfg = scaled_config(BASE, "branches", 4.0)
    assert cfg.branches == 4 and cfg.spec == BASE.spec
    assert ratios(cfg) == pytest.approx({"flops": 4, "params": 4, "acts": 4})


@pytest.mark.parametrize("arch", ["wrn-16-4", "resnet56", "resnext29-8x64d"])
@pytest.mark.parametrize("t", [2, 4, 8])
def test_k_splitting_keeps_flops_and_params_and_grows_acts_by_sqrt_k(arch, t):
    base = NetConfig(arch_spec(arch), branches=1, resolution=32)
    cfg = scaled_config(base, "split", t, divisor=1)
    assert cfg.branches == t
    got = ratios(cfg, base)
    assert abs(got["params"] - 1) <= 0.10 and abs(got["flops"] - 1) <= 0.10, got
    assert abs(got["acts"] / math.sqrt(t) - 1) <= 0.10, got


def test_cli_prints_table_and_writes_csv_and_png(tmp_path, capsys):
    csv_path, png_path = tmp_path / "scaling.csv", tmp_path / "scaling.png"
    assert main(["--model", "wrn", "--depth", "16", "--width", "2", "--factors", "2", "4", "--csv", str(csv_path),
                 "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds (MACs)" in out and "K=1 r=32 d=2,2,2 w=32,64,128 stem=16" in out
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 + 7 * 2
    assert {r["strategy"] for r in rows} == {"base", "depth", "width", "resolution", "dwr", "fast", "branches",
                                            "split"}
    assert {"flops", "params", "acts", "flops_ratio", "params_ratio", "acts_ratio"} <= set(rows[0])
    split4 = next(r for r in rows if r["strategy"] == "split" and float(r["factor"]) == 4)
    assert int(split4["branches"]) == 4 and abs(float(split4["params_ratio"]) - 1) < 0.1
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "groupnet.scaling", "--model", "small_cnn", "--factors", "2",
                          "--strategies", "width", "split", "--csv", str(tmp_path / "t.csv")],
                         capture_output=True, text=True, check=True).stdout
    assert "split" in out and "Conventions" in out
    assert (tmp_path / "t.csv").exists()


def test_timed_rows_and_time_plot(tmp_path):
    """The --time path on a tiny net (functional check only: nothing about speed is asserted)."""
    base = NetConfig(arch_spec("small_cnn"), branches=1, resolution=8)
    train_ms, infer_ms = measure_time(base, in_channels=1, batch_size=2, repeats=1)
    assert train_ms > 0 and infer_ms > 0
    rows = scaling_rows(base, [2.0], ["width", "branches"], in_channels=1, timed=True, batch_size=2, repeats=1)
    assert all(r.train_ms is not None for r in rows)
    write_plot(rows, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
