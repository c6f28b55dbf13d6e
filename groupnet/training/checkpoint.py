"""Checkpoints: atomic writes, validated reads, and the RNG states that make a resumed run continue exactly.

A checkpoint is a dict saved with ``torch.save`` that loads with ``weights_only=True`` (tensors, numbers, strings,
lists, dicts only). Keys: ``format``, ``version``, ``recipe`` (the TrainRecipe as a dict; run options are never
saved), ``model_meta`` (arch, K, classes, input shape, normalisation), ``model``, ``optimizer``, ``lr_scheduler``,
``cot_ramp``, ``scaler``, ``sampler`` (seed and epoch: the data order and the augmentation are functions of them),
``epoch`` (completed epochs), ``best_acc``, ``history`` (the metric rows so far) and ``rng`` (torch, CUDA, numpy and
python states).

Version 1 checkpoints hold one flat ``config`` with the recipe and the run options together; :func:`load` reads
them and returns them in the current form, their recipe split out of ``config``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupnet.training.config import saved_recipe
from groupnet.training.errors import CheckpointError

FORMAT = "groupnet-train-checkpoint"
VERSION = 2
#: Versions :func:`load` reads (older ones are converted to the current form on load).
READABLE_VERSIONS = (1, 2)
LAST, BEST = "last.pt", "best.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then ``os.replace`` it onto ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def resolve(path: str | Path) -> Path:
    """A checkpoint file from a file path or a run folder (its ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        p = p / LAST
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist (give a checkpoint file or a run folder with {LAST})")
    return p


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and sanity-check a trainer checkpoint, in the current form whatever its version; a truncated, corrupt
    or foreign file raises CheckpointError."""
    p = resolve(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {p}: the file is truncated or not a torch checkpoint ({detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a groupnet training checkpoint (no format tag {FORMAT!r})")
    version = ckpt.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{p} has checkpoint version {version}, this groupnet reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    options_key = "config" if version == 1 else "recipe"
    missing = [k for k in (options_key, "model_meta", "model", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {p} lacks {missing}")
    if version == 1:  # one flat config of recipe and run options: keep the recipe
        ckpt["recipe"] = saved_recipe(ckpt.pop("config"))
        ckpt["version"] = VERSION
    return ckpt


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, python), in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x
