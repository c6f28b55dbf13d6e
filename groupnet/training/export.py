"""Export each branch of a grouped model as a standalone program that loads with plain torch.

``export/branch_{k}.pt2`` is a ``torch.export`` program of ``extract_branch(model, k)`` (plain convs, linears and
batch norms, eval mode) with a dynamic batch dimension; it holds only aten ops, so loading it needs neither
groupnet nor its grouped layers::

    program = torch.export.load("export/branch_0.pt2")
    logits = program.module()(images)          # images (N, C, H, W), normalised with meta.json's mean/std

``meta.json`` (also inside each .pt2 as an extra file) records the input shape, normalisation and class names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groupnet.model_stacking import extract_branch, num_branches
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
