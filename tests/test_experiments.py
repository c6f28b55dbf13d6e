"""The multi-seed runner: every cell trained once, its final metrics recorded, the table's statistics computed
from them, and a rerun that trains nothing."""

from __future__ import annotations

import json
import math
import statistics

from scipy.stats import ttest_ind

from groupnet.experiments import main
from helpers.train_runs import QUICK


def test_a_small_grid_reports_mean_std_and_welch_tests_and_resumes(tmp_path, capsys):
    root = tmp_path / "grid"
    argv = ["--branches", "1", "2", "--seeds", "0", "1", "--cot-weights", "0.5", "0", "-o", str(root), "--",
            *[a for a in QUICK if a not in ("--no-progress", "--no-baseline")], "--epochs", "1"]
    assert main(argv) == 0
    results = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    # K=1 once per seed (no divergence term to weigh), K=2 per weight and seed
    assert sorted((r["branches"], r["cot_weight"], r["seed"]) for r in results) == [
        (1, 0.5, 0), (1, 0.5, 1), (2, 0.0, 0), (2, 0.0, 1), (2, 0.5, 0), (2, 0.5, 1)]
    for r in results:
        last = json.loads((root / r["cell"] / "metrics.jsonl").read_text().splitlines()[-1])
        branch = [last[f"test_acc_{i}"] for i in range(r["branches"])]
        assert r["ensemble_acc"] == last["test_acc_ensemble"] and r["best_branch_acc"] == max(branch)
        assert 0 <= r["ensemble_ece"] <= 100
    table = (root / "results.md").read_text()
    k2 = [r for r in results if r["branches"] == 2 and r["cot_weight"] == 0.5]
    k1 = [r for r in results if r["branches"] == 1]
    row = next(line for line in table.splitlines() if line.startswith("| digits | small_cnn | 2 | 0.5 |"))
    accs = [r["ensemble_acc"] for r in k2]
    assert f"{statistics.mean(accs):.2f} +- {statistics.stdev(accs):.2f}" in row
    p = ttest_ind(accs, [r["ensemble_acc"] for r in k1], equal_var=False).pvalue
    assert (f"{p:.3f}" in row) or math.isnan(p)
    assert (root / "results.png").stat().st_size > 0

    capsys.readouterr()
    assert main(argv) == 0
    assert "0 to train" in capsys.readouterr().out
    assert len((root / "results.jsonl").read_text().splitlines()) == 6
