"""A deterministic, resumable, rank-aware sampler: the data order is a pure function of (seed, epoch).

Every process draws the same permutation of the whole data set for an epoch; global batch b is the slice
``perm[b*B : (b+1)*B]`` and rank r of W takes its contiguous share ``[r*B/W, (r+1)*B/W)``. So W processes with
per-rank batch B/W see exactly the images one process sees with batch B, and resuming at epoch e needs only
(seed, e). Items are ``(epoch, index)`` pairs, which :mod:`groupnet.data.views` uses to seed augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """Yield this rank's ``(epoch, index)`` items for the epoch set with :meth:`set_epoch`.

    Args:
        size: data set length.
        global_batch: images per optimisation step over all processes.
        shuffle: a fresh permutation per epoch (training) or the natural order (evaluation).
        drop_last: drop the final incomplete global batch (training, so every step has a full batch).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, size: int, global_batch: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of world_size {world_size}")
        self.size, self.global_batch, self.shuffle, self.drop_last = size, global_batch, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def _my_indices(self) -> list[int]:
        order = self._order()
        per_rank = self.global_batch // self.world_size
        n_full = len(order) // self.global_batch
        mine = []
        for b in range(n_full):
            start = b * self.global_batch + self.rank * per_rank
            mine.extend(order[start : start + per_rank])
        tail = order[n_full * self.global_batch :]
        if tail and not self.drop_last:
            mine.extend(tail[self.rank :: self.world_size])  # the last partial batch, shared out round-robin
        return mine

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self._my_indices()])

    def __len__(self) -> int:
        return len(self._my_indices())

    def steps_per_epoch(self) -> int:
        """Optimisation steps per epoch (equal on every rank)."""
        full, tail = divmod(self.size, self.global_batch)
        return full + (1 if tail and not self.drop_last else 0)
