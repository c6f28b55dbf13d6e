"""Dynamic sparse training (SET, RigL) per (branch, layer), with ITOP's drop-rate schedule.

Every ``update_interval`` optimizer steps (up to ``update_until`` of training), for each layer and each branch
separately (never a top-k across branches, so no branch can take another's active weights):

1. **prune** the ``n = ceil(p * active)`` active weights of smallest magnitude;
2. **regrow** exactly ``n`` positions among the inactive ones (just-pruned positions included, as in the official
   code): uniformly at random (``"set"``) or those of largest dense gradient magnitude of the last batch (``"rigl"``);
3. regrown weights and their optimizer state start at **zero**; the fired masks record every position ever active.

Selections are exact top-k: ties are broken by a random order drawn from the masking's generator (so every process of
a DDP run, holding the same weights and gradients, picks the same positions). The active count of every
(branch, layer) is checked after each update. ``p`` decays from ``drop_rate`` to 0.005 by a cosine over the update
window (ITOP's ``CosineDecay``), or stays constant. ``"static"`` keeps the initial masks (still applied every step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from groupnet.sparse.masks import Masking

DST_METHODS = ("static", "set", "rigl")
DROP_SCHEDULES = ("cosine", "constant")
#: The drop rate the cosine schedule ends at (ITOP's ``CosineDecay`` ``eta_min``).
MIN_DROP_RATE = 0.005

__all__ = ["DROP_SCHEDULES", "DST_METHODS", "DynamicSparseTraining", "MIN_DROP_RATE", "select"]


def select(scores: Tensor, eligible: Tensor, n: int, generator: torch.Generator, *, largest: bool) -> Tensor:
    """Flat indices of exactly ``n`` eligible positions of smallest (or largest) ``scores``; ties broken by a
    random order from ``generator``. ``scores`` and ``eligible`` are flat and of equal length."""
    count = int(eligible.sum())
    if n > count:
        raise RuntimeError(f"cannot select {n} of {count} eligible positions")
    order = torch.randperm(scores.numel(), generator=generator).to(scores.device)
    s = scores[order].double()
    s = -s if largest else s
    s = torch.where(eligible[order], s, torch.full_like(s, math.inf))
    s = torch.nan_to_num(s, nan=math.inf, posinf=math.inf)  # a NaN score is never preferred
    picked = torch.sort(s, stable=True).indices[:n]
    return order[picked]


class DynamicSparseTraining:
    """Drives a :class:`Masking` through training: call :meth:`step` after every optimizer step.

    Args:
        masking: the masks (and the optimizer whose state they mask).
        method: ``"static"``, ``"set"`` (random regrowth) or ``"rigl"`` (gradient regrowth).
        total_steps: optimizer steps of the whole training run (the schedule's length).
        update_interval: delta-T, optimizer steps between mask updates (>= 1).
        drop_rate: the initial fraction p of active weights pruned and regrown per update, in [0, 1].
        drop_schedule: ``"cosine"`` (p decays to 0.005 at ``update_until``) or ``"constant"``.
        update_until: fraction of ``total_steps`` after which masks stop changing, in [0, 1].
    """

    def __init__(self, masking: Masking, method: str = "rigl", *, total_steps: int, update_interval: int = 100,
                 drop_rate: float = 0.5, drop_schedule: str = "cosine", update_until: float = 0.75) -> None:
        check_dst_options(method, update_interval, drop_rate, drop_schedule, update_until)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.masking, self.method = masking, method
        self.total_steps, self.update_interval = total_steps, update_interval
        self.drop_rate, self.drop_schedule, self.update_until = float(drop_rate), drop_schedule, float(update_until)
        self.end_step = math.floor(update_until * total_steps)
        #: Mask updates done so far and the step of the last one.
        self.updates, self.last_update_step = 0, 0

    def rate(self, step: int) -> float:
        """The drop rate p at optimizer step ``step``."""
        if self.drop_schedule == "constant" or self.end_step == 0:
            return self.drop_rate
        low = min(MIN_DROP_RATE, self.drop_rate)
        t = min(step, self.end_step) / self.end_step
        return low + (self.drop_rate - low) * 0.5 * (1 + math.cos(math.pi * t))

    def is_update_step(self, step: int) -> bool:
        return self.method != "static" and step % self.update_interval == 0 and step <= self.end_step

    def step(self, step: int) -> bool:
        """After optimizer step ``step`` (1-based): apply the masks, and update them when it is time. Returns whether
        the masks changed. For ``"rigl"`` the weights' ``.grad`` must still hold the last batch's gradients."""
        self.masking.apply()
        if not self.is_update_step(step):
            return False
        self.update(self.rate(step))
        self.updates += 1
        self.last_update_step = step
        return True

    @torch.no_grad()
    def update(self, rate: float) -> dict[str, int]:
        """One prune-and-regrow of every (branch, layer) at drop rate ``rate``; returns the weights moved per layer
        (all branches)."""
        m = self.masking
        moved: dict[str, int] = {}
        for w in m.layers:
            p = m.params[w.name]
            if self.method == "rigl" and p.grad is None:
                raise RuntimeError(f"RigL regrowth needs the dense gradient of {w.name}, but its .grad is None: "
                                   "call step() after the optimizer step and before zeroing the gradients")
            mask = m.branch_view(w.name, m.masks[w.name]).clone()
            weight = m.branch_view(w.name, p.detach())
            grad = m.branch_view(w.name, p.grad.detach()) if self.method == "rigl" else None
            grown = torch.zeros_like(mask)
            total = 0
            for k in range(w.branches):
                active = int(mask[k].sum())
                n = min(math.ceil(rate * active), active, w.numel - active)
                if n <= 0:
                    continue
                drop = select(weight[k].abs(), mask[k], n, m.generator, largest=False)
                mask[k, drop] = False
                inactive = ~mask[k]
                if self.method == "set":
                    scores = torch.rand(w.numel, generator=m.generator).to(weight.device)
                    grow = select(scores, inactive, n, m.generator, largest=True)
                else:
                    grow = select(grad[k].abs(), inactive, n, m.generator, largest=True)  # type: ignore[index]
                mask[k, grow] = True
                grown[k, grow] = True
                total += n
            moved[w.name] = total
            new_mask = mask.reshape(p.shape)
            m.masks[w.name] = new_mask
            m.fired[w.name] |= new_mask
            m.zero_state_at(w.name, grown.reshape(p.shape))
        m.apply()
        m.check_counts()
        return moved

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "total_steps": self.total_steps, "update_interval": self.update_interval,
                "drop_rate": self.drop_rate, "drop_schedule": self.drop_schedule, "update_until": self.update_until,
                "updates": self.updates, "last_update_step": self.last_update_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the update counters. The method and the schedule's settings must be the saved ones; the total
        steps may differ (a resumed run trained for more epochs stretches the schedule to its new length)."""
        mine = self.state_dict()
        for key in ("method", "update_interval", "drop_rate", "drop_schedule", "update_until"):
            if state[key] != mine[key]:
                raise ValueError(f"saved sparse schedule has {key}={state[key]!r}, this run {mine[key]!r}")
        self.updates, self.last_update_step = int(state["updates"]), int(state["last_update_step"])


def check_dst_options(method: str, update_interval: int, drop_rate: float, drop_schedule: str,
                      update_until: float) -> None:
    """ValueError naming the first bad option."""
    if method not in DST_METHODS:
        raise ValueError(f"dst method must be one of {DST_METHODS}, got {method!r}")
    if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
        raise ValueError(f"update interval (optimizer steps between mask updates) must be an int >= 1, "
                         f"got {update_interval!r}")
    if not isinstance(drop_rate, (int, float)) or not math.isfinite(drop_rate) or not 0 <= drop_rate <= 1:
        raise ValueError(f"drop rate (fraction of active weights pruned per update) must be in [0, 1], "
                         f"got {drop_rate!r}")
    if drop_schedule not in DROP_SCHEDULES:
        raise ValueError(f"drop schedule must be one of {DROP_SCHEDULES}, got {drop_schedule!r}")
    if not isinstance(update_until, (int, float)) or not math.isfinite(update_until) or not 0 <= update_until <= 1:
        raise ValueError(f"update until (fraction of training after which masks stop changing) must be in [0, 1], "
                         f"got {update_until!r}")
