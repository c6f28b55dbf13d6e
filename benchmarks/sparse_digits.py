"""Sparse training on the embedded digits data: dense vs static vs SET vs RigL at two densities, K=1 and K=2, over
seeds, with the ITOP rate R_s. A report, not an assertion (the README's table comes from this script).

    python benchmarks/sparse_digits.py --epochs 10 --seeds 0 1 2 --out benchmarks/sparse_digits.json

Runs sequentially in this process, one torch thread, no loader workers; each run's folder is a temporary directory.
Prints the markdown table and writes every run's summary to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from groupnet.train import main

METHODS = [("dense", None), ("static", 0.5), ("set", 0.5), ("rigl", 0.5), ("static", 0.1), ("set", 0.1),
           ("rigl", 0.1)]


def run_one(method: str, density: float | None, k: int, seed: int, epochs: int, interval: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["--epochs", str(epochs), "--branches", str(k), "--seed", str(seed), "--no-baseline", "--no-progress",
                "--workers", "0", "--threads", "1", "--output-dir", str(out)]
        if density is not None:
            args += ["--density", str(density), "--dst", method, "--update-interval", str(interval)]
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = main(args)
        if rc != 0:
            raise RuntimeError(f"run {method} {density} K={k} seed {seed} failed:\n{log.getvalue()[-3000:]}")
        return json.loads((out / "summary.json").read_text())


def fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| method | density | K=1 acc % | K=1 R_s | K=2 ensemble acc % | K=2 branch acc % | K=2 R_s per branch | "
             "K=2 union R_s | K=2 mask overlap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, density in METHODS:
        def pick(k: int) -> list[dict]:
            return [r for r in rows if r["method"] == method and r["density"] == density and r["branches"] == k]

        one, two = pick(1), pick(2)
        sp1 = [r["summary"].get("sparse") for r in one]
        sp2 = [r["summary"].get("sparse") for r in two]
        cells = [
            method, "1" if density is None else f"{density}",
            fmt([r["summary"]["test_acc_ensemble"] for r in one]),
            fmt([s["itop_rate"][0] for s in sp1 if s], 3) if density else "1",
            fmt([r["summary"]["test_acc_ensemble"] for r in two]),
            fmt([statistics.fmean(r["summary"]["test_acc"]) for r in two]),
            fmt([statistics.fmean(s["itop_rate"]) for s in sp2 if s], 3) if density else "1",
            fmt([s["itop_rate_union"] for s in sp2 if s], 3) if density else "1",
            fmt([s["mask_overlap"] for s in sp2 if s], 3) if density else "1",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--update-interval", type=int, default=20, help="optimizer steps between mask updates")
    p.add_argument("--out", default="benchmarks/sparse_digits.json")
    a = p.parse_args(argv)
    rows = []
    start = time.perf_counter()
    for seed in a.seeds:
        for k in (1, 2):
            for method, density in METHODS:
                t = time.perf_counter()
                summary = run_one(method, density, k, seed, a.epochs, a.update_interval)
                rows.append({"method": method, "density": density, "branches": k, "seed": seed, "summary": summary})
                print(f"{method:>6} density {density} K={k} seed {seed}: ensemble {summary['test_acc_ensemble']:.2f}% "
                      f"({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
                Path(a.out).write_text(json.dumps({"epochs": a.epochs, "seeds": a.seeds,
                                                   "update_interval": a.update_interval, "rows": rows}, indent=1))
    wall = time.perf_counter() - start
    print(table(rows))
    print(f"\n{a.epochs} epochs, batch 64, update interval {a.update_interval} steps, seeds {a.seeds}; "
          f"{wall / 60:.1f} min on {platform.machine()} {platform.processor() or ''}, 1 thread")
    return 0


if __name__ == "__main__":
    sys.exit(run())
