"""The embedded default data set: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, no download).

Split: stratified 80/20 train/test with ``sklearn.model_selection.train_test_split(random_state=0)``, i.e. 1437
training and 360 test images, the same on every machine. Pixels are the data set's 0..16 intensities scaled to
[0, 1], one channel.
"""

from __future__ import annotations

import torch

from groupnet.data.images import TensorImageDataset

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def load_digits_split() -> tuple[TensorImageDataset, TensorImageDataset]:
    """The fixed (train, test) split of the digits data set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).long()
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels.numpy(),
    )
    classes = [str(c) for c in bunch.target_names]
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return (
        TensorImageDataset(images[idx_train], labels[idx_train], classes),
        TensorImageDataset(images[idx_test], labels[idx_test], classes),
    )
