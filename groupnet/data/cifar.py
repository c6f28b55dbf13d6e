"""CIFAR-10 and CIFAR-100 read from the standard "python version" archive folders; nothing is downloaded.

Expected layout under ``data_dir`` (the folders ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html extract to):

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``
- ``cifar-100-python/``: ``train``, ``test``, ``meta`` (the 100 fine labels are used)

Each file is a pickled dict with ``data`` (uint8, ``(N, 3072)``, channel-major 32x32 RGB) and ``labels`` /
``fine_labels``. The pickles are read with an unpickler that only rebuilds numpy arrays (no arbitrary code).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupnet.data.errors import DataError
from groupnet.data.images import TensorImageDataset

CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
_FILES = {
    10: ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"),
    100: (["train"], ["test"], "meta"),
}
_LABEL_KEY = {10: "labels", 100: "fine_labels"}
_NAMES_KEY = {10: "label_names", 100: "fine_label_names"}
_ARCHIVE = {10: "cifar-10-python.tar.gz", 100: "cifar-100-python.tar.gz"}

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def _str(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, forbidden content
        raise DataError(f"cannot read CIFAR batch file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"CIFAR batch file {path} holds a {type(raw).__name__}, expected a dict")
    return {_str(k): v for k, v in raw.items()}


def cifar_folder(data_dir: str | Path, num_classes: int) -> Path:
    """The archive folder of CIFAR-``num_classes`` under ``data_dir`` (or ``data_dir`` itself if it is that folder)."""
    if num_classes not in CIFAR_FOLDERS:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    data_dir = Path(data_dir)
    name = CIFAR_FOLDERS[num_classes]
    folder = data_dir if data_dir.name == name else data_dir / name
    train_files, test_files, meta = _FILES[num_classes]
    missing = [f for f in [*train_files, *test_files, meta] if not (folder / f).is_file()]
    if missing:
        where = f"{folder} does not exist" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
        raise DataError(
            f"CIFAR-{num_classes} not found: {where}. Put the folder {name}/ (extracted from {_ARCHIVE[num_classes]}, "
            f"https://www.cs.toronto.edu/~kriz/cifar.html) under --data-dir {data_dir}, holding "
            f"{', '.join([*train_files, *test_files, meta])}; groupnet downloads nothing."
        )
    return folder


def _images_and_labels(paths: list[Path], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        batch = _read_batch(path)
        key = _LABEL_KEY[num_classes]
        if "data" not in batch or key not in batch:
            raise DataError(f"CIFAR batch file {path} lacks the keys 'data' and '{key}' (has {sorted(batch)})")
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != lab.shape[0]:
            raise DataError(
                f"CIFAR batch file {path}: expected 'data' uint8 (N, 3072) and N labels, got {data.dtype} "
                f"{data.shape} and {lab.shape[0]} labels"
            )
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise DataError(
                f"CIFAR batch file {path}: labels must lie in [0, {num_classes}), got [{lab.min()}, {lab.max()}]")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab))
    return torch.cat(images), torch.cat(labels)


def load_cifar(data_dir: str | Path, num_classes: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The (train, test) sets of CIFAR-10 or CIFAR-100 as uint8 images ``(N, 3, 32, 32)``."""
    folder = cifar_folder(data_dir, num_classes)
    train_files, test_files, meta_file = _FILES[num_classes]
    meta = _read_batch(folder / meta_file)
    names_key = _NAMES_KEY[num_classes]
    classes = [_str(n) for n in meta.get(names_key, [])]
    if len(classes) != num_classes:
        raise DataError(f"{folder / meta_file}: expected {num_classes} names under '{names_key}', got {len(classes)}")
    train = _images_and_labels([folder / f for f in train_files], num_classes)
    test = _images_and_labels([folder / f for f in test_files], num_classes)
    return TensorImageDataset(*train, classes), TensorImageDataset(*test, classes)
