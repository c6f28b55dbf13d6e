"""Sparse training of the K branches of a grouped model: per-branch masks (:mod:`~groupnet.sparse.masks`),
ERK / uniform initialisation (:mod:`~groupnet.sparse.init`), dynamic sparse training with SET or RigL
(:mod:`~groupnet.sparse.dst`) and In-Time Over-Parameterization statistics (:mod:`~groupnet.sparse.itop`).

Density = fraction of a weight's entries kept active; sparsity = 1 - density. Usable without the trainer::

    masking = Masking(model, density=0.1, init="erk", optimizer=optimizer, seed=0)
    masking.apply()
    dst = DynamicSparseTraining(masking, "rigl", total_steps=steps, update_interval=100)
    for step, (x, y) in enumerate(loader, 1):
        optimizer.zero_grad(); loss(model(x), y).backward(); optimizer.step()
        dst.step(step)                       # masks weights and optimizer state; prunes and regrows every 100 steps
    print(itop_stats(masking).itop_rate)     # R_s per branch
"""

from groupnet.sparse.dst import DROP_SCHEDULES, DST_METHODS, MIN_DROP_RATE, DynamicSparseTraining, check_dst_options
from groupnet.sparse.init import (
    SPARSE_INITS,
    active_count,
    check_density,
    erk_densities,
    layer_densities,
    uniform_densities,
)
from groupnet.sparse.itop import ItopStats, itop_stats
from groupnet.sparse.masks import MaskedWeight, Masking, maskable_weights

__all__ = [
    "DROP_SCHEDULES", "DST_METHODS", "MIN_DROP_RATE", "SPARSE_INITS",
    "DynamicSparseTraining", "ItopStats", "MaskedWeight", "Masking",
    "active_count", "check_density", "check_dst_options", "erk_densities", "itop_stats", "layer_densities",
    "maskable_weights", "uniform_densities",
]
