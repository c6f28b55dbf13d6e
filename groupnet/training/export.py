"""Export each branch of a grouped model as a standalone program that loads with plain torch.

``export/branch_{k}.pt2`` is a ``torch.export`` program of ``extract_branch(model, k)`` (plain convs, linears and
batch norms, eval mode) with a dynamic batch dimension; it holds only aten ops, so loading it needs neither
groupnet nor its grouped layers::

    program = torch.export.load("export/branch_0.pt2")
    logits = program.module()(images)          # images (N, C, H, W), normalised with meta.json's mean/std

``meta.json`` (also inside each .pt2 as an extra file) records the input shape, normalisation and class names.

``export/ensemble.pt2`` (:func:`export_ensemble`) is one program of the whole grouped model that takes the images
once (shared by all K branches) and returns the ensemble's scores ``(N, num_classes)``, combined as the run's
``--ensemble`` mode says; it is traced on the torch path, so it too loads without groupnet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groupnet.ensembling import ensemble
from groupnet.model_stacking import extract_branch, num_branches
from groupnet.ops import use_backend
from groupnet.training.distributed import revert_sync_batchnorm


def export_branches(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``branch_{k}.pt2`` for every branch k and ``meta.json``; returns the program paths.

    ``meta`` must hold ``in_channels`` and ``image_size`` (the example input is ``(2, C, S, S)``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, s = int(meta["in_channels"]), int(meta["image_size"])
    device = next(model.parameters()).device
    example = torch.zeros(2, c, s, s, device=device)
    meta_text = json.dumps(meta, indent=2)
    (out_dir / "meta.json").write_text(meta_text + "\n")
    paths = []
    for k in range(num_branches(model)):
        branch = revert_sync_batchnorm(extract_branch(model, k)).eval()
        program = torch.export.export(branch, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        path = out_dir / f"branch_{k}.pt2"
        torch.export.save(program, path, extra_files={"meta.json": meta_text})
        paths.append(path)
    return paths


class EnsembleOfBranches(nn.Module):
    """``ensemble(model(x), K, mode)``: the grouped model on one shared view, its K outputs combined."""

    def __init__(self, model: nn.Module, branches: int, mode: str) -> None:
        super().__init__()
        self.model, self.branches, self.mode = model, branches, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble(self.model(x), self.branches, self.mode)  # type: ignore[arg-type]


def export_ensemble(model: nn.Module, out_dir: str | Path, meta: dict[str, Any], mode: str = "logits") -> Path:
    """Write ``ensemble.pt2``: the whole ensemble as one ``torch.export`` program (dynamic batch) that maps images
    ``(N, C, S, S)`` to ensemble scores ``(N, num_classes)``; also writes ``meta.json``. Returns the path."""
    import copy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, s = int(meta["in_channels"]), int(meta["image_size"])
    device = next(model.parameters()).device
    example = torch.zeros(2, c, s, s, device=device)
    meta_text = json.dumps({**meta, "ensemble": mode}, indent=2)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    grouped = revert_sync_batchnorm(copy.deepcopy(model)).eval()
    if hasattr(grouped, "execution_order"):
        grouped.execution_order = "grouped"  # one graph of grouped ops, whatever the CPU cache would pick
    wrapper = EnsembleOfBranches(grouped, num_branches(model), mode).eval()
    with use_backend("torch"):  # aten convolutions and bmm: the program needs no groupnet custom op to load
        program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = out_dir / "ensemble.pt2"
    torch.export.save(program, path, extra_files={"meta.json": meta_text})
    return path
