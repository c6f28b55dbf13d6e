"""Precise batch norm: re-estimate the running statistics of a model's batch norms from a few batches.

After training with mixed widths the running statistics of a dynamic batch norm were updated by every augmented
model, so they do not describe the tiny model (NetAug README note 4). Before evaluation they are recomputed: reset,
then the exact mean over the given batches (momentum None, a cumulative average), in training mode without
gradients. Each branch's statistics come from its own channels of the stacked layout, so this is per branch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Recompute the running statistics of every batch norm of ``model`` from ``batches`` (inputs only) and return
    how many images were used. Momenta and train/eval modes are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    modes = {m: m.training for m in model.modules()}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    try:
        model.train()
        for x in batches:
            model(x)
            seen += x.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    if seen == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    return seen
