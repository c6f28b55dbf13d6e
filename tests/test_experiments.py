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


def _result(recipe, k, seed, acc, nll, w=0.5):
    return {"cell": f"{recipe}-{k}-{seed}", "dataset": "digits", "model": "small_cnn", "recipe": recipe, "branches": k,
            "cot_weight": w, "seed": seed, "ensemble_acc": acc, "best_branch_acc": acc, "mean_branch_acc": acc,
            "ensemble_nll": nll, "ensemble_ece": 1.0, "seconds": 1.0}


def test_several_recipes_get_a_column_and_a_test_against_the_first(tmp_path):
    """Each recipe is its own group; K > 1 is compared with K = 1 of the same recipe, and each recipe with the first
    one seen at the same K and weight; one recipe alone keeps the table without the recipe columns."""
    from groupnet.experiments import plot, summary_table

    accs = {("basic", 1): [97.0, 98.0, 99.0], ("basic", 4): [98.0, 98.5, 99.5],
            ("splitnet-cifar", 1): [95.0, 96.5, 96.0], ("splitnet-cifar", 4): [97.5, 96.0, 97.0]}
    results = [_result(recipe, k, seed, acc, nll=acc / 1000) for (recipe, k), values in accs.items()
               for seed, acc in enumerate(values)]
    table = summary_table(results).splitlines()
    assert table[0].startswith("| data set | model | recipe | K |") and "p acc vs basic" in table[0]
    row = next(line for line in table if line.startswith("| digits | small_cnn | splitnet-cifar | 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    col = dict(zip(head, cells))
    vs_k1 = ttest_ind(accs[("splitnet-cifar", 4)], accs[("splitnet-cifar", 1)], equal_var=False).pvalue
    vs_basic = ttest_ind(accs[("splitnet-cifar", 4)], accs[("basic", 4)], equal_var=False).pvalue
    assert col["p acc vs K=1"] == f"{vs_k1:.3f}" and col["p acc vs basic"] == f"{vs_basic:.3f}"
    basic_row = next(line for line in table if line.startswith("| digits | small_cnn | basic | 4 |"))
    assert basic_row.rstrip(" |").split("|")[-2].strip() == ""  # basic is the reference: no p against itself
    assert "recipe" not in summary_table([r for r in results if r["recipe"] == "basic"]).splitlines()[0]
    plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_the_recipes_axis_trains_each_recipe_and_records_it(tmp_path):
    root = tmp_path / "grid"
    argv = ["--branches", "1", "--seeds", "0", "--recipes", "basic", "splitnet-cifar", "-o", str(root), "--",
            *[a for a in QUICK if a not in ("--no-progress", "--no-baseline")], "--epochs", "1"]
    assert main(argv) == 0
    results = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert [(r["cell"], r["recipe"]) for r in results] == [
        ("digits-small_cnn-k1-cot0.5-s0-basic", "basic"), ("digits-small_cnn-k1-cot0.5-s0-splitnet-cifar",
                                                            "splitnet-cifar")]
    for r in results:
        assert json.loads((root / r["cell"] / "config.json").read_text())["recipe"] == r["recipe"]
