"""Per-epoch metric files of a run: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.csv`` and the
``curves.png`` plot. The rows live in the checkpoint too, so a resumed run rewrites the files from the
checkpoint's rows (dropping any epoch logged after the last checkpoint) and appends from there."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

JSONL, CSV, PLOT = "metrics.jsonl", "metrics.csv", "curves.png"


class MetricsLog:
    """Append epoch rows to the JSON-lines and CSV files in ``run_dir``."""

    def __init__(self, run_dir: str | Path, history: list[dict[str, Any]] | None = None) -> None:
        self.dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = list(history or [])
        self._rewrite()

    def _rewrite(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / JSONL, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        tmp = self.dir / f".{CSV}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.dir / CSV)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.dir / JSONL, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()  # rewritten whole: the columns are fixed within a run, the file is small


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Loss, accuracy and schedule curves of a run as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not rows:
        return
    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in rows]

    branch_ids = sorted(int(k.rsplit("_", 1)[1]) for k in rows[-1] if k.startswith("test_acc_") and k[-1].isdigit())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for i in branch_ids:
        ax.plot(epochs, series(f"train_ce_{i}"), label=f"train CE branch {i}")
        ax.plot(epochs, series(f"test_ce_{i}"), "--", label=f"test CE branch {i}")
    ax.plot(epochs, series("train_divergence"), label="train divergence")
    ax.set(xlabel="epoch", ylabel="loss", title="losses")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i in branch_ids:
        ax.plot(epochs, series(f"test_acc_{i}"), label=f"test branch {i}")
    ax.plot(epochs, series("test_acc_ensemble"), "k", linewidth=2, label="test ensemble")
    ax.plot(epochs, series("train_acc_ensemble"), "k:", label="train ensemble")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(epochs, series("lr"), label="learning rate")
    ax.plot(epochs, series("cot_weight"), label="co-training weight")
    ax.set(xlabel="epoch", title="schedules")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
