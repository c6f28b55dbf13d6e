"""Per-epoch metric files of a run: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.csv`` and the
``curves.png`` plot.

The rows live in the checkpoint too, and the files are rewritten whole from them (through a temporary file and
an atomic replace, never through a symlink) right after each checkpoint is saved, so they describe exactly the
epochs that ``last.pt`` holds (a crash between the two writes leaves them one epoch behind, and a resumed run
rewrites them from its checkpoint). Values that are not finite are written as ``null``: the files stay valid JSON.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from groupnet.training.run_folder import atomic_write, atomic_write_text, dumps, finite_json

JSONL, CSV, PLOT = "metrics.jsonl", "metrics.csv", "curves.png"


class MetricsLog:
    """The JSON-lines and CSV files of a run's epoch rows in ``run_dir``."""

    def __init__(self, run_dir: str | Path, history: list[dict[str, Any]] | None = None) -> None:
        self.dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = list(history or [])

    def write(self, rows: list[dict[str, Any]] | None = None) -> None:
        """Rewrite both files from ``rows`` (default: the rows so far)."""
        if rows is not None:
            self.rows = list(rows)
        atomic_write_text(self.dir / JSONL, "".join(dumps(row) + "\n" for row in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=columns)
        w.writeheader()
        w.writerows(finite_json(self.rows))
        atomic_write_text(self.dir / CSV, buf.getvalue())

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()  # rewritten whole: the file is small (one row per epoch)


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
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
