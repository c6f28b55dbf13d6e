"""The learning-rate schedule: linear warm-up, then cosine decay (or constant), set per optimisation step."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineLR(LRScheduler):
    """Step-wise LR: ``warmup_lr -> lr`` linearly over ``warmup_steps``, then cosine ``lr -> min_lr`` until
    ``total_steps`` (or constant ``lr`` with ``schedule="constant"``). Call :meth:`step` after each optimiser step.

    A ``torch.optim.lr_scheduler.LRScheduler``: ``last_epoch`` counts steps, ``get_last_lr()`` gives the rate of
    every parameter group (all groups share it). The rate is a function of the step count alone, so
    ``state_dict()`` holds that count (``{"last_epoch": n, "step_count": n}``; a state with only ``step_count``, as
    earlier checkpoints have, loads too) and a resumed run continues with exactly the rates of the original one.
    """

    def __init__(self, optimizer: Optimizer, *, lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0, schedule: str = "cosine") -> None:
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.lr, self.total_steps = lr, total_steps
        self.warmup_steps, self.warmup_lr, self.min_lr, self.schedule = warmup_steps, warmup_lr, min_lr, schedule
        super().__init__(optimizer)  # runs step 0: sets every group's rate to lr_at(0)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    @property
    def step_count(self) -> int:
        """Optimiser steps taken so far (``last_epoch``)."""
        return self.last_epoch

    def current_lr(self) -> float:
        return self.lr_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "step_count": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "last_epoch" not in state and "step_count" not in state:
            raise KeyError(f"WarmupCosineLR state needs 'last_epoch' (or 'step_count'), got keys {sorted(state)}")
        self.last_epoch = int(state.get("last_epoch", state.get("step_count")))
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
