"""``python -m groupnet.experiments``: the same training over a grid of data sets, models, augmentation recipes, K,
co-training weights and seeds, and one table of what the grid says: mean +- std over seeds of the ensemble's, the best
branch's and the mean branch's test accuracy, the ensemble's NLL and expected calibration error, with Welch's t-test
of each K > 1 against K = 1, of each co-training weight against 0 and, with several ``--recipes``, of each recipe
against the first.

Every cell is one trainer run in ``OUT/<dataset>-<model>-k<K>-cot<w>-s<seed>`` (``-<recipe>`` appended when
``--recipes`` is given); its final test metrics are appended to ``OUT/results.jsonl``. Rerunning the same command
skips finished cells and resumes an interrupted one, so a long grid can be stopped and continued. Trainer options
after ``--`` apply to every cell, e.g.
``python -m groupnet.experiments --branches 1 2 4 --seeds 0 1 2 3 4 -- --epochs 30``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS, TABLE, PLOT = "results.jsonl", "results.md", "results.png"
#: Metrics of a cell, as (key, column title); accuracies and ECE in %.
METRICS = (("ensemble_acc", "ensemble acc"), ("best_branch_acc", "best branch"), ("mean_branch_acc", "mean branch"),
           ("ensemble_nll", "ensemble NLL"), ("ensemble_ece", "ECE %"))


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    dataset: str
    model: str
    branches: int
    cot_weight: float
    seed: int
    recipe: str | None = None  # None: the trainer's recipe (its default, or --recipe after --)

    @property
    def name(self) -> str:
        name = f"{self.dataset}-{self.model}-k{self.branches}-cot{self.cot_weight:g}-s{self.seed}"
        return name if self.recipe is None else f"{name}-{self.recipe}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m groupnet.experiments",
        description="Train a grid of data sets x models x K x co-training weights x seeds and report mean +- std "
                    "over seeds with significance tests. Trainer options after -- apply to every run.")
    p.add_argument("--datasets", nargs="+", default=["digits"], help="data sets [digits]")
    p.add_argument("--models", nargs="+", default=["small_cnn"], help="zoo models [small_cnn]")
    p.add_argument("--branches", "-K", nargs="+", type=int, default=[1, 2, 4], help="values of K [1 2 4]")
    p.add_argument("--cot-weights", nargs="+", type=float, default=[0.5],
                   help="co-training weights; add 0 to measure what the divergence term does [0.5]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="[0 1 2 3 4]")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="augmentation recipes to compare (the trainer's --recipe), the first one the reference of "
                        "the p-values [the trainer's recipe]")
    p.add_argument("--output-dir", "-o", default="runs/experiments", help="grid folder [runs/experiments]")
    return p


def cells(args: argparse.Namespace) -> list[Cell]:
    grid = itertools.product(args.datasets, args.models, args.recipes or [None], args.branches, args.cot_weights,
                             args.seeds)
    out = []
    for dataset, model, recipe, k, w, seed in grid:
        if k == 1 and w != args.cot_weights[0]:
            continue  # one branch has no divergence term: its runs would repeat each other
        out.append(Cell(dataset, model, k, w, seed, recipe))
    return out


def cell_result(cell: Cell, row: dict[str, Any], seconds: float, recipe: str) -> dict[str, Any]:
    """The cell's final test metrics from the last row of its metrics; ``recipe``: the augmentation it trained with."""
    branch_accs = [row[f"test_acc_{i}"] for i in range(cell.branches)]
    return {
        "cell": cell.name, "dataset": cell.dataset, "model": cell.model, "recipe": recipe, "branches": cell.branches,
        "cot_weight": cell.cot_weight, "seed": cell.seed, "epochs": row["epoch"],
        "ensemble_acc": row["test_acc_ensemble"], "best_branch_acc": max(branch_accs),
        "mean_branch_acc": sum(branch_accs) / len(branch_accs), "ensemble_nll": row["test_ce_ensemble"],
        "ensemble_ece": row.get("test_ece_ensemble", math.nan), "seconds": seconds,
    }


def run_cell(cell: Cell, root: Path, trainer_argv: list[str]) -> dict[str, Any]:
    """Train one cell (resuming its checkpoint if an earlier invocation was interrupted); returns its result."""
    from groupnet.training.config import parse_options
    from groupnet.training.trainer import config_for_run, run

    folder = root / cell.name
    argv = [*trainer_argv, "--dataset", cell.dataset, "--model", cell.model, "--branches", str(cell.branches),
            "--cot-weight", str(cell.cot_weight), "--seed", str(cell.seed), "--no-baseline", "--no-progress",
            "--output-dir", str(folder)]
    if cell.recipe is not None:
        argv += ["--recipe", cell.recipe]
    if (folder / "last.pt").is_file():
        argv += ["--resume", str(folder)]
    from_file, from_cli = parse_options(argv)
    recipe, options, ckpt = config_for_run(from_file, from_cli)
    start = time.perf_counter()
    run(recipe, options, ckpt)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return cell_result(cell, rows[-1], seconds, recipe.recipe)


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["cell"]] = r
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (nan when either side has fewer than 2 runs or no spread)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def recipes_of(results: list[dict[str, Any]]) -> list[str]:
    """The augmentation recipes of ``results`` in the order first seen; a result without one trained with ``basic``."""
    return list(dict.fromkeys(recipe_of(r) for r in results))


def recipe_of(result: dict[str, Any]) -> str:
    return result.get("recipe", "basic")


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per (data set, model, recipe, K, co-training weight), mean +- std over seeds, and p-values.

    With more than one augmentation recipe among ``results`` (a result without one trained with ``basic``) the table
    has a recipe column and Welch's test of each recipe against the first one seen, at the same data set, model, K
    and weight."""
    recipes = recipes_of(results)
    several = len(recipes) > 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        key = (r["dataset"], r["model"], recipes.index(recipe_of(r)), r["branches"], r["cot_weight"])
        groups.setdefault(key, []).append(r)
    head = ["data set", "model", *(["recipe"] if several else []), "K", "cot w", "seeds", *[t for _, t in METRICS],
            "p acc vs K=1", "p NLL vs K=1", "p acc vs w=0",
            *([f"p acc vs {recipes[0]}", f"p NLL vs {recipes[0]}"] if several else []), "s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups):
        dataset, model, recipe, k, w = key
        rows = groups[key]
        cols = [dataset, model, *([recipes[recipe]] if several else []), str(k), f"{w:g}" if k > 1 else "-",
                str(len(rows))]
        for metric, _ in METRICS:
            m, sd = mean_std([r[metric] for r in rows])
            digits = 3 if metric == "ensemble_nll" else 2
            cols.append(f"{m:.{digits}f} +- {sd:.{digits}f}" if not math.isnan(sd) else f"{m:.{digits}f}")
        base = next((v for (d, mo, rc, kk, _), v in groups.items() if (d, mo, rc, kk) == (dataset, model, recipe, 1)),
                    None)
        refs = [(base, "ensemble_acc"), (base, "ensemble_nll"), (groups.get((dataset, model, recipe, k, 0.0)),
                                                                  "ensemble_acc")]
        if several:
            first = groups.get((dataset, model, 0, k, w))
            refs += [(first, "ensemble_acc"), (first, "ensemble_nll")]
        for ref, metric in refs:
            same = ref is None or ref is rows
            p = math.nan if same else welch_p([r[metric] for r in rows], [r[metric] for r in ref])
            cols.append("" if same else f"{p:.3f}")
        cols.append(f"{mean_std([r['seconds'] for r in rows])[0]:.0f}")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Ensemble and mean-branch accuracy against K, mean +- std over seeds, one panel per (data set, model), one line
    per co-training weight (and recipe, when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = recipes_of(results)
    panels = sorted({(r["dataset"], r["model"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels):
        ks = sorted({r["branches"] for r in results if (r["dataset"], r["model"]) == (dataset, model)})
        for recipe, w in itertools.product(recipes, sorted({r["cot_weight"] for r in results})):
            for metric, style in (("ensemble_acc", "o-"), ("mean_branch_acc", "s--")):
                values = [[r[metric] for r in results if (r["dataset"], r["model"], r["branches"]) ==
                           (dataset, model, k) and recipe_of(r) == recipe
                           and (k == 1 or r["cot_weight"] == w)] for k in ks]
                if not all(values):
                    continue  # a weight or recipe this panel's grid did not run at every K
                stats = [mean_std(v) for v in values]
                label = f"{metric.replace('_acc', '').replace('_', ' ')}, w={w:g}"
                ax.errorbar(ks, [m for m, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd in stats],
                            fmt=style, capsize=3, label=f"{label}, {recipe}" if len(recipes) > 1 else label)
        ax.set(title=f"{model} on {dataset}", xlabel="K (branches)", ylabel="test accuracy %")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the grid's missing cells, then write and print the table; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    from groupnet.data.errors import DataError  # after parsing: --help does not import torch
    from groupnet.training.errors import UserError, one_line

    if any(k < 1 for k in args.branches):
        print("groupnet.experiments: error: --branches values must be >= 1", file=sys.stderr)
        return 2
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    done = load_results(root / RESULTS)
    grid = cells(args)
    todo = [c for c in grid if c.name not in done]
    print(f"{len(grid)} runs in {root}: {len(grid) - len(todo)} done, {len(todo)} to train", flush=True)
    try:
        for i, cell in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {cell.name}", flush=True)
            result = run_cell(cell, root, trainer_argv)
            with open(root / RESULTS, "a") as f:
                f.write(json.dumps(result) + "\n")
            done[cell.name] = result
    except (UserError, DataError) as e:
        print(f"groupnet.experiments: error: {one_line(e)}", file=sys.stderr)
        return 2
    results = [done[c.name] for c in grid]
    table = summary_table(results)
    (root / TABLE).write_text(table + "\n")
    plot(results, root / PLOT)
    print("\n" + table + f"\n\ntable in {root / TABLE}, plot in {root / PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
