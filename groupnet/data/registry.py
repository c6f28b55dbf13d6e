"""The data sets the trainer knows by name, with their shapes, normalisation and default augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from groupnet.data.cifar import CIFAR_FOLDERS, load_cifar
from groupnet.data.digits import load_digits_split
from groupnet.data.errors import DataError
from groupnet.data.image_folder import load_image_folder
from groupnet.data.mnist5k import load_mnist5k_split

DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "folder")

_CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class DataBundle:
    """A train and a test set with what the model and the augmentation need to know about them.

    ``flip`` is the default for horizontal flipping: off for digits (a mirrored 2, 3, 7 is no longer that digit),
    on for natural images. ``padding`` is the default crop padding (a shift of up to 1/8 of the side).
    """

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int
    flip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(name: str, data_dir: str | Path | None = None, *, image_size: int | None = None,
                 train_subset: int | None = None) -> DataBundle:
    """Load a data set by name (``digits``, ``mnist5k``, ``cifar10``, ``cifar100``, ``folder``) from ``data_dir``.

    ``train_subset`` keeps N training images (quick checks): a stratified pick, the same for every run (see
    :func:`stratified_subset`).
    """
    if name == "digits":
        train, test = load_digits_split()
        mean = (float(train.images.mean()),)
        std = (float(train.images.std()),)
        bundle = DataBundle(name, train, test, train.classes, 1, 8, mean, std, padding=1, flip=False)
    elif name == "mnist5k":
        train, test = load_mnist5k_split()
        mean = (float(train.images.mean()),)
        std = (float(train.images.std()),)
        bundle = DataBundle(name, train, test, train.classes, 1, 28, mean, std, padding=2, flip=False)
    elif name in ("cifar10", "cifar100"):
        n = 10 if name == "cifar10" else 100
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir: the folder that holds {CIFAR_FOLDERS[n]}/")
        train, test = load_cifar(data_dir, n)
        mean, std = _CIFAR_STATS[n]
        bundle = DataBundle(name, train, test, train.classes, 3, 32, mean, std, padding=4, flip=True)
    elif name == "folder":
        if data_dir is None:
            raise DataError("the folder data set needs --data-dir: a folder with train/<class>/ and test/<class>/")
        size = image_size or 32
        train, test = load_image_folder(data_dir, size)
        bundle = DataBundle(name, train, test, train.classes, 3, size, (0.5,) * 3, (0.5,) * 3,
                            padding=max(size // 8, 1), flip=True)
    else:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and name != "folder" and image_size != bundle.image_size:
        raise DataError(f"--image-size applies to the folder data set only; {name} images are {bundle.image_size}px")
    if train_subset is not None:
        if train_subset < 1:
            raise DataError(f"train subset must be >= 1 images, got {train_subset}")
        bundle.train = Subset(bundle.train, stratified_subset(labels_of(bundle.train), train_subset))
    return bundle


#: The subset of ``--train-subset`` is part of the data's definition, not of the run: every seed trains on the
#: same images, so a comparison over seeds compares training, not data.
SUBSET_SEED = 0


def stratified_subset(labels: torch.Tensor, size: int, seed: int = SUBSET_SEED) -> list[int]:
    """Sorted indices of ``size`` samples drawn without replacement so that each class keeps its share of the
    labels (largest-remainder rounding), chosen at random within each class by ``seed``."""
    n = len(labels)
    if size >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * size / n
    take = quota.floor().long()
    short = size - int(take.sum())
    if short:  # the largest remainders get one more; ties by a seeded shuffle, so no class is always favoured
        order = torch.randperm(len(classes), generator=gen)
        ranked = order[torch.argsort((quota - take)[order], descending=True, stable=True)]
        take[ranked[:short]] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == c).flatten()
        picked += members[torch.randperm(len(members), generator=gen)[:k]].tolist()
    return sorted(picked)


def labels_of(ds: Dataset) -> torch.Tensor:
    """All labels of a data set built here (without decoding images)."""
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices)]
    return ds.labels  # type: ignore[attr-defined]
