"""K-view data sets: each training image yields K independently augmented views stacked along channels.

Item of :class:`MultiViewDataset`: ``(K*C, H, W)``, view k in channels ``[k*C, (k+1)*C)`` so branch k of a grouped
model trains on view k (SplitNet's "different data views"). :class:`SingleViewDataset` gives the one un-augmented
view ``(C, H, W)`` that evaluation feeds to every branch.

Randomness: view k of sample i in epoch e is drawn from a generator seeded by (seed, e, i); the index the sampler
yields carries the epoch (see :class:`groupnet.data.sampler.EpochSampler`), so the result does not depend on
which worker or which process draws it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from groupnet.data.augment import Augment


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, index), well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class _Normalized(Dataset):
    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.base = base
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def normalize(self, img: Tensor) -> Tensor:
        return (img - self.mean) / self.std


class MultiViewDataset(_Normalized):
    """K augmented, normalised views of each image, stacked: items ``((K*C, H, W), label)``.

    Indexed by ``(epoch, index)`` pairs (or a plain index, meaning epoch 0).
    """

    def __init__(self, base: Dataset, views: int, augment: Augment, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0) -> None:
        super().__init__(base, mean, std)
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.views, self.augment, self.seed = views, augment, seed

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img, label = self.base[index]
        g = sample_generator(self.seed, epoch, index)
        views = [self.normalize(self.augment(img, g)) for _ in range(self.views)]
        return torch.cat(views, dim=0), label


class SingleViewDataset(_Normalized):
    """The normalised image as it is, for evaluation: items ``((C, H, W), label)``."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index = key[1] if isinstance(key, tuple) else key
        img, label = self.base[index]
        return self.normalize(img), label
