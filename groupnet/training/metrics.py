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


#: Colour of the K=1 baseline's curves; branch i is matplotlib's "C{i}" in every panel, the ensemble black.
BASELINE_COLOUR = "0.55"


def curves_figure(rows: list[dict[str, Any]], title: str = "", baseline: list[dict[str, Any]] | None = None):
    """The matplotlib figure of ``plot_curves`` (Agg backend); the caller closes it.

    Panels: cross-entropy per branch (train solid, test dashed), accuracy (branches, ensemble, and the K=1
    ``baseline`` rows when given; the y axis is zoomed to the values of the second half of training, where the runs
    differ), the co-training divergence with its weight on a second axis (K > 1 only), and the learning rate.
    Each branch has one colour in every panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]

    def series(key: str, of: list[dict[str, Any]] | None = None) -> list[float]:
        return [_finite(r.get(key)) for r in (rows if of is None else of)]

    branch_ids = sorted(int(k.rsplit("_", 1)[1]) for k in rows[-1] if k.startswith("test_acc_") and k[-1].isdigit())
    cotrained = len(branch_ids) > 1
    names = ["loss", "accuracy", *(["co-training"] if cotrained else []), "learning rate"]
    grid = (2, 2) if len(names) == 4 else (1, len(names))
    fig, axes = plt.subplots(*grid, figsize=(5.5 * grid[1], 4.2 * grid[0]), squeeze=False)
    axes = list(axes.flat)
    ax_of = dict(zip(names, axes))
    base_epochs = [r["epoch"] for r in baseline] if baseline else []

    ax = ax_of["loss"]
    for i in branch_ids:
        ax.plot(epochs, series(f"train_ce_{i}"), color=f"C{i}", label=f"branch {i} train")
        ax.plot(epochs, series(f"test_ce_{i}"), "--", color=f"C{i}", label=f"branch {i} test")
    if cotrained:
        ax.plot(epochs, series("test_ce_ensemble"), "--", color="k", label="ensemble test")
    if baseline:
        ax.plot(base_epochs, series("test_ce_0", baseline), "--", color=BASELINE_COLOUR, linewidth=2,
                label="K=1 baseline test")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss (train solid, test dashed)", yscale="log")

    ax = ax_of["accuracy"]
    zoomed: list[float] = []
    for i in branch_ids:
        ax.plot(epochs, series(f"test_acc_{i}"), color=f"C{i}", label=f"branch {i} test")
        zoomed += series(f"test_acc_{i}")[len(rows) // 2:]
    if cotrained:
        ax.plot(epochs, series("test_acc_ensemble"), color="k", linewidth=2, label="ensemble test")
        zoomed += series("test_acc_ensemble")[len(rows) // 2:]
    train_key = "train_acc_ensemble" if cotrained else f"train_acc_{branch_ids[0]}"
    ax.plot(epochs, series(train_key), ":", color="k" if cotrained else f"C{branch_ids[0]}",
            label="ensemble train" if cotrained else f"branch {branch_ids[0]} train")
    zoomed += series(train_key)[len(rows) // 2:]
    if baseline:
        ax.plot(base_epochs, series("test_acc_0", baseline), "-.", color=BASELINE_COLOUR, linewidth=2,
                label="K=1 baseline test")
        zoomed += series("test_acc_0", baseline)[len(baseline) // 2:]
    zoomed = [v for v in zoomed if math.isfinite(v)]
    if zoomed:
        lo, hi = min(zoomed), max(zoomed)
        pad = max(0.5, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) + 0.2)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (y zoomed to the second half)")

    if cotrained:
        ax = ax_of["co-training"]
        ax.plot(epochs, series("train_divergence"), color="tab:purple", label="train divergence")
        ax.set(xlabel="epoch", ylabel="divergence", title="co-training")
        weight_ax = ax.twinx()
        weight_ax.plot(epochs, series("cot_weight"), "--", color="tab:brown", label="weight (right axis)")
        weight_ax.set_ylabel("co-training weight")
        weight_ax.set_ylim(bottom=0)
        lines = ax.get_lines() + weight_ax.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="center right")

    ax = ax_of["learning rate"]
    ax.plot(epochs, series("lr"), color="tab:green", label="learning rate")
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    ax.set_ylim(bottom=0)
    for name in ("loss", "accuracy"):
        ax_of[name].legend(fontsize=7, ncol=2 if len(branch_ids) > 2 else 1)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _finite(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "",
                baseline: list[dict[str, Any]] | None = None) -> None:
    """Loss, accuracy, co-training and learning-rate curves of a run as a PNG (see :func:`curves_figure`), with
    the K=1 baseline's rows overlaid when given."""
    if not rows:
        return
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, title, baseline)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
