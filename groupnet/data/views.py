"""K-view data sets: each training image yields K independently augmented views stacked along channels.

Item of :class:`MultiViewDataset`: ``(K*C, H, W)``, view k in channels ``[k*C, (k+1)*C)`` so branch k of a grouped
model trains on view k (SplitNet's "different data views"). :class:`SingleViewDataset` gives the one un-augmented
view ``(C, H, W)`` that evaluation feeds to every branch.

The views of a whole loader batch are drawn as one batch op (:meth:`groupnet.data.augment.Augment.views`: the
images repeated K times, one kornia pass, every row with its own parameters), through the batched fetch
``__getitems__`` the DataLoader calls. Randomness: the views of a batch are drawn from a generator seeded by (seed,
epoch, the batch's sample indices); the indices the sampler yields carry the epoch (see
:class:`groupnet.data.sampler.EpochSampler`), so the views do not depend on which worker draws them nor on a resume
point. They do depend on how the global batch is split over processes: under DDP each process draws the views of
its own share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from groupnet.data.augment import Augment


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, index), well mixed by numpy's SeedSequence: the generator of a batch
    of one sample."""
    return batch_generator(seed, [(epoch, index)])


def batch_generator(seed: int, keys: Sequence[tuple[int, int]]) -> torch.Generator:
    """A generator seeded from the run's seed and a batch's (epoch, index) keys, mixed by numpy's SeedSequence."""
    entropy = [seed] + [v for key in keys for v in key]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class _Normalized(Dataset):
    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.base = base
        self.mean_values, self.std_values = tuple(mean), tuple(std)
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
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple[Tensor, int]]:
        """The items of a batch of keys, their views drawn as one batch op."""
        pairs = [key if isinstance(key, tuple) else (0, key) for key in keys]
        samples = [self.base[index] for _, index in pairs]
        images = torch.stack([img for img, _ in samples])
        g = batch_generator(self.seed, pairs)
        views = self.augment.views(images, self.views, self.mean_values, self.std_values, g)
        return [(v, label) for v, (_, label) in zip(views, samples)]


class SingleViewDataset(_Normalized):
    """The normalised image as it is, for evaluation: items ``((C, H, W), label)``."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index = key[1] if isinstance(key, tuple) else key
        img, label = self.base[index]
        return self.normalize(img), label
