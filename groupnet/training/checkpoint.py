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

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupnet.training.config import coerce, saved_recipe
from groupnet.training.errors import CheckpointError, ConfigError
from groupnet.training.run_folder import atomic_write

FORMAT = "groupnet-train-checkpoint"
VERSION = 2
#: Versions :func:`load` reads (older ones are converted to the current form on load).
READABLE_VERSIONS = (1, 2)
LAST, BEST = "last.pt", "best.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then ``os.replace`` it onto ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file (a temporary file a
    kill left behind is removed when the next run opens the folder).
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def resolve(path: str | Path) -> Path:
    """A checkpoint file from a file path or a run folder (its ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        p = p / LAST
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist (give a checkpoint file or a run folder with {LAST})")
    return p


def load(path: str | Path, map_location: str | torch.device = "cpu", *, training_state: bool = False
         ) -> dict[str, Any]:
    """Read and check a trainer checkpoint, in the current form whatever its version.

    A truncated, corrupt, foreign or structurally wrong file raises CheckpointError naming what is wrong; a file
    holding Python objects other than tensors, numbers, strings, lists and dicts is refused without being run.
    ``training_state``: also require everything a resumed run restores (optimizer, schedules, sampler, RNG states).
    """
    p = resolve(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        what = next(iter(_unsupported_globals(text)), None)
        if what is not None:
            raise CheckpointError(
                f"refused checkpoint {p}: it holds Python objects ({what}), not only tensors, numbers, strings, "
                "lists and dicts; groupnet never writes such a file and does not load one, since loading it could "
                "run code") from None
        # torch's message for a file it cannot unpickle safely advises loading it unsafely: keep only the cause
        match = re.search(r"WeightsUnpickler error: ([^.]*)", text)
        detail = match.group(1).strip() if match else _first_line(e)
        raise CheckpointError(f"cannot read checkpoint {p}: the file is truncated or not a torch checkpoint "
                              f"({detail})") from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {p}: the file is truncated or not a torch checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a groupnet training checkpoint (no format tag {FORMAT!r})")
    version = ckpt.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(f"{p} has checkpoint version {version!r}, this groupnet reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    options_key = "config" if version == 1 else "recipe"
    required = [options_key, "model_meta", "model", "epoch"] + (list(TRAINING_STATE) if training_state else [])
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {p} lacks {missing}" + (
            " (it cannot be resumed; it can still be evaluated)" if set(missing) <= set(TRAINING_STATE) else ""))
    if not isinstance(ckpt[options_key], dict):
        raise CheckpointError(f"checkpoint {p}: {options_key!r} must be a dict of options, got "
                              f"{type(ckpt[options_key]).__name__}")
    if version == 1:  # one flat config of recipe and run options: keep the recipe
        ckpt["recipe"] = saved_recipe(ckpt.pop("config"))
        ckpt["version"] = VERSION
    check_structure(ckpt, p)
    return ckpt


#: What a resumed run restores besides the model.
TRAINING_STATE = ("optimizer", "lr_scheduler", "cot_ramp", "scaler", "sampler", "rng")


def check_structure(ckpt: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError naming the first entry of ``ckpt`` whose type or shape is not what the trainer
    writes (checked for the entries present; :func:`load` decides which must be)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is damaged: {what}")

    try:
        recipe = saved_recipe(ckpt["recipe"])
        for k, v in recipe.items():
            coerce(k, v, "")
    except ConfigError as e:
        raise bad(f"its recipe is invalid ({str(e).lstrip(': ')})") from None
    meta = ckpt["model_meta"]
    if not isinstance(meta, dict):
        raise bad(f"'model_meta' must be a dict, got {type(meta).__name__}")
    for k in ("num_classes", "in_channels", "branches", "image_size"):
        if k in meta and not _is_int(meta[k], minimum=1):
            raise bad(f"model_meta[{k!r}] must be an int >= 1, got {meta[k]!r}")
    for k in ("mean", "std"):
        if k in meta and not (isinstance(meta[k], list) and all(_is_number(x) for x in meta[k])):
            raise bad(f"model_meta[{k!r}] must be a list of numbers, got {meta[k]!r}")
    if "classes" in meta and not (isinstance(meta["classes"], list) and all(isinstance(c, str) for c in meta["classes"])):
        raise bad("model_meta['classes'] must be a list of class names")
    _check_tensor_dict(ckpt["model"], "'model'", bad)
    if not _is_int(ckpt["epoch"], minimum=0):
        raise bad(f"'epoch' must be an int >= 0 (completed epochs), got {ckpt['epoch']!r}")
    if "best_acc" in ckpt and not _is_number(ckpt["best_acc"]):
        raise bad(f"'best_acc' must be a number, got {ckpt['best_acc']!r}")
    if "best_epoch" in ckpt and not _is_int(ckpt["best_epoch"], minimum=0):
        raise bad(f"'best_epoch' must be an int >= 0, got {ckpt['best_epoch']!r}")
    if "history" in ckpt:
        h = ckpt["history"]
        if not (isinstance(h, list) and all(isinstance(r, dict) for r in h)):
            raise bad(f"'history' must be a list of metric rows (dicts), got {type(h).__name__}")
    for k in ("optimizer", "lr_scheduler", "cot_ramp", "scaler"):
        if k in ckpt and not isinstance(ckpt[k], dict):
            raise bad(f"{k!r} must be a dict (a state_dict), got {type(ckpt[k]).__name__}")
    if "sampler" in ckpt:
        s = ckpt["sampler"]
        if not (isinstance(s, dict) and _is_int(s.get("seed")) and _is_int(s.get("epoch"), minimum=0)):
            raise bad(f"'sampler' must be a dict with int 'seed' and 'epoch', got {s!r}")
    if "rng" in ckpt:
        _check_rng(ckpt["rng"], bad)
    if "hooks" in ckpt:
        hooks = ckpt["hooks"]
        if not (isinstance(hooks, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in hooks.items())):
            raise bad("'hooks' must be a dict of hook name -> state dict")


def _check_rng(rng: Any, bad) -> None:
    if not isinstance(rng, dict):
        raise bad(f"'rng' must be a dict of RNG states, got {type(rng).__name__}")
    missing = [k for k in ("torch", "numpy", "python") if k not in rng]
    if missing:
        raise bad(f"'rng' lacks {missing}")
    t = rng["torch"]
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
            and t.numel() == torch.get_rng_state().numel()):
        raise bad(f"rng['torch'] must be a uint8 tensor of {torch.get_rng_state().numel()} bytes (a torch RNG state)")
    n = rng["numpy"]
    if not (isinstance(n, dict) and isinstance(n.get("key"), torch.Tensor) and n["key"].shape == (624,)
            and not n["key"].is_floating_point() and _is_int(n.get("pos"), minimum=0)
            and _is_int(n.get("has_gauss")) and _is_number(n.get("cached_gaussian"))):
        raise bad("rng['numpy'] must hold an MT19937 state (key: 624 ints, pos, has_gauss, cached_gaussian)")
    py = rng["python"]
    if not (isinstance(py, list) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], list)
            and len(py[1]) == 625 and all(_is_int(x) for x in py[1]) and (py[2] is None or _is_number(py[2]))):
        raise bad("rng['python'] must hold a random.getstate() state (version, 625 ints, gauss)")
    if "cuda" in rng:
        c = rng["cuda"]
        if not (isinstance(c, list) and all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 for x in c)):
            raise bad("rng['cuda'] must be a list of uint8 tensors (CUDA RNG states)")


def _check_tensor_dict(d: Any, name: str, bad) -> None:
    if not isinstance(d, dict):
        raise bad(f"{name} must be a dict of tensors (a state_dict), got {type(d).__name__}")
    for k, v in d.items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            raise bad(f"{name} must be a dict of tensors (a state_dict); entry {k!r} is {type(v).__name__}")


def _is_int(x: Any, minimum: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and (minimum is None or x >= minimum)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unsupported_globals(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"GLOBAL [\w.]+", text)]


def peek(path: str | Path) -> dict[str, Any]:
    """A checkpoint's small entries (epoch, best_acc, best_epoch, ...) without reading its tensors; ``{}`` when
    the file cannot be read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    if not isinstance(ckpt, dict):
        return {}
    return {k: v for k, v in ckpt.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


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
