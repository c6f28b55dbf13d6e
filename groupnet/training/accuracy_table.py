"""The end-of-run table: per-branch and ensemble test accuracy next to the K=1 baseline."""

from __future__ import annotations

from typing import Any


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def accuracy_table(summary: dict[str, Any], baseline: dict[str, Any] | None = None,
                   baseline_command: str | None = None) -> str:
    """A plain-text table from run summaries (see ``Trainer.summary``)."""
    k, mode = summary["branches"], summary["ensemble"]
    per_branch_params = summary["params"] // k
    sparse = summary.get("sparse")  # sparse training: density and ITOP rate R_s columns
    lines = [
        f"Test accuracy: {summary['dataset']} ({summary['test_images']} test images), {summary['model']}, "
        f"{summary['epochs']} epochs",
        f"{'model':<30}{'params':>10}{'test acc %':>12}" + (f"{'density':>10}{'R_s':>8}" if sparse else ""),
    ]

    def extra(s: dict[str, Any] | None, rate: float) -> str:
        return f"{s['density']:>10.3f}{rate:>8.3f}" if s else ""

    for i, acc in enumerate(summary["test_acc"]):
        rate = sparse["itop_rate"][i] if sparse else 0.0
        lines.append(f"{f'K={k} branch {i}':<30}{_params(per_branch_params):>10}{acc:>12.2f}{extra(sparse, rate)}")
    if k > 1:
        name, acc = f"K={k} ensemble ({mode})", summary["test_acc_ensemble"]
        rate = sparse["itop_rate_union"] if sparse else 0.0  # the union of the branches' fired masks
        lines.append(f"{name:<30}{_params(summary['params']):>10}{acc:>12.2f}{extra(sparse, rate)}")
    if baseline is not None:
        base_sparse = baseline.get("sparse")
        rate = base_sparse["itop_rate"][0] if base_sparse else 0.0
        lines.append(f"{'K=1 baseline':<30}{_params(baseline['params']):>10}{baseline['test_acc_ensemble']:>12.2f}"
                     f"{extra(base_sparse, rate)}")
    if sparse and k > 1:
        lines.append("R_s: fraction of a branch's weights ever active; the ensemble's is the union over branches")
    elif baseline_command:
        lines.append(f"K=1 baseline not trained; run: {baseline_command}")
    return "\n".join(lines)
