"""Tiny data sets written to disk in the real formats: CIFAR python archives and an image folder."""

from __future__ import annotations

import pickle

import numpy as np


def _write_batch(path, data, labels, label_key):
    with open(path, "wb") as f:  # bytes keys, as the original python-2 pickles load under encoding="bytes"
        pickle.dump({b"batch_label": b"fake", label_key: list(map(int, labels)), b"data": data,
                     b"filenames": [b"x.png"] * len(labels)}, f)


def make_fake_cifar(root, num_classes, per_file=6, seed=0):
    """A CIFAR archive folder in the real format, with few images; returns (train, test) (images, labels)."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder, train_names, test_names, meta, key, names_key = (
            root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
            b"labels", b"label_names")
    else:
        folder, train_names, test_names, meta, key, names_key = (
            root / "cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names")
    folder.mkdir(parents=True)
    parts = {}
    for split, names in (("train", train_names), ("test", test_names)):
        datas, labs = [], []
        for name in names:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            lab = rng.integers(0, num_classes, per_file)
            _write_batch(folder / name, data, lab, key)
            datas.append(data)
            labs.append(lab)
        parts[split] = (np.concatenate(datas).reshape(-1, 3, 32, 32), np.concatenate(labs))
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: [f"class{i}".encode() for i in range(num_classes)]}, f)
    return parts["train"], parts["test"]


def write_images(root, split, per_class, size, rng):
    """PNG files ``root/split/<class>/<i>.png`` of random RGB pixels; returns {(class, i): array}."""
    from PIL import Image

    arrays = {}
    for c, n in per_class.items():
        (root / split / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / split / c / f"{i}.png")
            arrays[(c, i)] = arr
    return arrays
