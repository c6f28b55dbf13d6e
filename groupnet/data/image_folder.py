"""An image-folder data set: one sub-folder per class, images read with Pillow and resized to a fixed square size.

Expected layout under ``data_dir``::

    train/<class name>/<image files>
    test/<class name>/<image files>      (``val/`` is accepted in place of ``test/``)

Classes are the sorted sub-folder names of ``train/``; ``test/`` may hold a subset of them. Hidden folders and
files (names starting with a dot, such as ``.ipynb_checkpoints/``) are skipped; a training class folder without
images, or fewer than 2 classes, is an error. Every image is checked with Pillow when the data set is loaded, so a
damaged file is reported by name before training starts. Images are converted to RGB and resized (bilinear) to
``image_size x image_size`` when read, so a worker process decodes each one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from groupnet.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _layout_hint(data_dir: Path) -> str:
    return (f"put one sub-folder per class under {data_dir}/train/ and {data_dir}/test/ (or val/), "
            f"each holding image files ({', '.join(IMAGE_EXTENSIONS)})")


def _scan(split_dir: Path, classes: list[str] | None, data_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    training = classes is None
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir} has class folders {unknown} that train/ does not have")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    empty = []
    for c in found:
        n = len(files)
        for p in sorted((split_dir / c).iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
                labels.append(index[c])
        if len(files) == n:
            empty.append(c)
    if training and empty and len(empty) < len(found):
        raise DataError(f"class folders {empty} in {split_dir} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                        "remove them or add images")
    if not files:
        raise DataError(f"no images found in {split_dir}: {_layout_hint(data_dir)}")
    return files, labels, classes


class ImageFolderDataset(Dataset):
    """Images listed from class sub-folders, decoded on access; items are float RGB ``(3, S, S)`` in [0, 1]."""

    def __init__(self, files: list[Path], labels: list[int], classes: list[str], image_size: int) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.files, self.classes, self.size = files, classes, image_size
        self.labels = torch.tensor(labels, dtype=torch.int64)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:
            raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0), int(self.labels[i])


def _verify(path: Path) -> None:
    """Pillow's integrity check of one image file (header and structure, without decoding all pixels)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e} (remove or replace the file)") from None


def load_image_folder(data_dir: str | Path, image_size: int) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The (train, test) image-folder sets under ``data_dir``."""
    try:
        import PIL  # noqa: F401
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        raise DataError("the image-folder data set reads images with Pillow: pip install pillow") from None
    data_dir = Path(data_dir)
    train_dir = data_dir / "train"
    test_dir = next((data_dir / n for n in ("test", "val") if (data_dir / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = [str(p) for p in (train_dir,) if not p.is_dir()] + ([] if test_dir else [f"{data_dir}/test (or val)"])
        raise DataError(f"image-folder data set not found: missing {', '.join(missing)}; {_layout_hint(data_dir)}")
    tr_files, tr_labels, classes = _scan(train_dir, None, data_dir)
    te_files, te_labels, _ = _scan(test_dir, classes, data_dir)
    if len(classes) < 2:
        raise DataError(f"{train_dir} holds {len(classes)} class folder ({classes[0]!r}); a classifier needs at "
                        f"least 2: {_layout_hint(data_dir)}")
    for path in (*tr_files, *te_files):
        _verify(path)
    return (ImageFolderDataset(tr_files, tr_labels, classes, image_size),
            ImageFolderDataset(te_files, te_labels, classes, image_size))
