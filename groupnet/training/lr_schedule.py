"""The learning-rate schedule: linear warm-up, then cosine decay (or constant), set per optimisation step."""

from __future__ import annotations

import math

from torch.optim import Optimizer


class WarmupCosineLR:
    """Step-wise LR: ``warmup_lr -> lr`` linearly over ``warmup_steps``, then cosine ``lr -> min_lr`` until
    ``total_steps`` (or constant ``lr`` with ``schedule="constant"``). Call :meth:`step` after each optimiser step.
    """

    def __init__(self, optimizer: Optimizer, *, lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0, schedule: str = "cosine") -> None:
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.optimizer, self.lr, self.total_steps = optimizer, lr, total_steps
        self.warmup_steps, self.warmup_lr, self.min_lr, self.schedule = warmup_steps, warmup_lr, min_lr, schedule
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def current_lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
