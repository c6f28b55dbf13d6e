"""DataLoaders for K-view training and single-view evaluation, sharded over processes."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from groupnet.data.augment import Augment
from groupnet.data.registry import DataBundle
from groupnet.data.sampler import EpochSampler
from groupnet.data.views import MultiViewDataset, SingleViewDataset


def train_loader(bundle: DataBundle, *, views: int, augment: Augment, global_batch: int, seed: int,
                 workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> tuple[DataLoader, EpochSampler]:
    """Batches ``(x (B/W, K*C, H, W), y (B/W,))`` of K-view images; call ``sampler.set_epoch(e)`` before each epoch.

    The last incomplete global batch is dropped, so every step of every process has a full batch.
    """
    ds = MultiViewDataset(bundle.train, views, augment, bundle.mean, bundle.std, seed=seed)
    sampler = EpochSampler(len(ds), global_batch, shuffle=True, drop_last=True, seed=seed, rank=rank,
                           world_size=world_size)
    if sampler.steps_per_epoch() == 0:
        raise ValueError(f"the global batch {global_batch} is larger than the {len(ds)} training images")
    return _loader(ds, sampler, global_batch // world_size, workers, seed, pin_memory), sampler


def eval_loader(bundle: DataBundle, *, batch_size: int, workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """Batches ``(x (b, C, H, W), y (b,))`` of this process's share of the test set, in order."""
    ds = SingleViewDataset(bundle.test, bundle.mean, bundle.std)
    sampler = EpochSampler(len(ds), batch_size * world_size, shuffle=False, drop_last=False, rank=rank,
                           world_size=world_size)
    return _loader(ds, sampler, batch_size, workers, 0, pin_memory)


def _loader(ds, sampler: EpochSampler, batch_size: int, workers: int, seed: int, pin_memory: bool) -> DataLoader:
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        # An own generator, so creating a loader iterator never draws from the global torch RNG (which dropout
        # uses): a resumed run then sees the same global RNG stream as a straight one.
        generator=torch.Generator().manual_seed(seed),
    )
