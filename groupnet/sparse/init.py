"""Per-layer densities of a sparse initialisation (ERK, uniform) and per-branch random masks with exact counts.

Terms: a layer's **density** is the fraction of its weights that are active (non-zero, trainable); its
**sparsity** is ``1 - density``. Every density here is computed from the shape of ONE branch's weight
(``(out, in/groups, kh, kw)`` for a conv, ``(out, in)`` for a linear), never from the K-stacked tensor: the
Erdos-Renyi ratio ``sum(shape) / prod(shape)`` is not invariant to stacking.

ERK follows the official code (Evci et al.'s ``get_sparsities_erdos_renyi``, used unchanged by sparse_learning and
ITOP): ``density_l = eps * raw_l`` with ``raw_l = sum(shape_l) / prod(shape_l)``, where ``eps`` is solved so that the
layers' active weights add up to ``density * total``; a layer whose ``eps * raw_l`` would exceed 1 is made dense
and ``eps`` is solved again without it (the dense-layer fixed point). Layers named in ``dense`` (for instance the
first and the last) start in the dense set, so the overall density stays the target.

Unlike the official code, which draws each mask as Bernoulli(density) (an approximate count), a mask here holds
exactly ``round(density * n)`` active weights per branch (at least 1), at positions drawn uniformly at random.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

SPARSE_INITS = ("erk", "uniform")

__all__ = ["SPARSE_INITS", "active_count", "check_density", "erk_densities", "layer_densities", "random_mask",
           "uniform_densities"]


def check_density(density: float, what: str = "density") -> float:
    """``density`` as a float in (0, 1] (the fraction of weights kept; sparsity is 1 - density), else ValueError."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density) \
            or not 0 < density <= 1:
        raise ValueError(f"{what} (the fraction of weights kept active; sparsity = 1 - density) must be in (0, 1], "
                         f"got {density!r}")
    return float(density)


def _check_shapes(shapes: Mapping[str, Sequence[int]], dense: Collection[str]) -> None:
    if not shapes:
        raise ValueError("no layers to sparsify: the model has no conv or linear weights")
    for name, shape in shapes.items():
        if not shape or any(int(s) < 1 for s in shape):
            raise ValueError(f"layer {name!r}: shape must be positive sizes, got {tuple(shape)}")
    unknown = sorted(set(dense) - set(shapes))
    if unknown:
        raise ValueError(f"dense layers {unknown} are not among the layers {sorted(shapes)}")


def _budget_check(shapes: Mapping[str, Sequence[int]], density: float, dense: set[str]) -> None:
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(math.prod(shapes[n]) for n in dense)
    if dense and kept >= density * total and len(dense) < len(shapes):
        raise ValueError(f"the dense layers {sorted(dense)} alone hold {kept} of the {density * total:.0f} weights "
                         f"that density {density} allows; raise the density or keep fewer layers dense")


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float,
                      dense: Collection[str] = ()) -> dict[str, float]:
    """Every layer at ``density``; layers in ``dense`` at 1 and the others lowered so that the overall density
    (active weights over all weights) stays ``density``."""
    density = check_density(density)
    _check_shapes(shapes, dense)
    dense = set(dense)
    _budget_check(shapes, density, dense)
    if not dense or density == 1.0:
        return {n: (1.0 if n in dense else density) for n in shapes}
    total = sum(math.prod(s) for s in shapes.values())
    rest = sum(math.prod(s) for n, s in shapes.items() if n not in dense)
    kept = total - rest
    d = (density * total - kept) / rest
    return {n: 1.0 if n in dense else d for n in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, dense: Collection[str] = (),
                  power_scale: float = 1.0) -> dict[str, float]:
    """ERK densities (Erdos-Renyi-Kernel, with kernel dims) of layers of the given one-branch shapes.

    Solves ``eps * sum_{l not dense} raw_l * N_l = sum_{l not dense} density * N_l - sum_{l dense} (1 - density) * N_l``
    with ``raw_l = (sum(shape_l) / prod(shape_l)) ** power_scale``, moving the layers of the largest ``raw_l`` into the
    dense set while ``eps * max raw_l > 1``. Returns ``{name: density_l}`` (1.0 for dense layers).
    """
    density = check_density(density)
    _check_shapes(shapes, dense)
    dense_set = set(dense)
    _budget_check(shapes, density, dense_set)
    if density == 1.0:
        return {n: 1.0 for n in shapes}
    numel = {n: math.prod(int(v) for v in s) for n, s in shapes.items()}
    raw_all = {n: (sum(int(v) for v in s) / numel[n]) ** power_scale for n, s in shapes.items()}
    while True:
        if len(dense_set) == len(shapes):
            raise ValueError(f"ERK cannot reach density {density}: every layer became dense")
        rhs = sum(density * numel[n] if n not in dense_set else -(1 - density) * numel[n] for n in shapes)
        divisor = sum(raw_all[n] * numel[n] for n in shapes if n not in dense_set)
        eps = rhs / divisor
        raw = {n: raw_all[n] for n in shapes if n not in dense_set}
        max_raw = max(raw.values())
        if eps * max_raw > 1:
            dense_set |= {n for n, r in raw.items() if r == max_raw}
        else:
            break
    return {n: 1.0 if n in dense_set else eps * raw_all[n] for n in shapes}


def layer_densities(method: str, shapes: Mapping[str, Sequence[int]], density: float,
                    dense: Collection[str] = ()) -> dict[str, float]:
    """Densities of ``method`` (``"erk"`` or ``"uniform"``), see :func:`erk_densities` / :func:`uniform_densities`."""
    if method == "erk":
        return erk_densities(shapes, density, dense)
    if method == "uniform":
        return uniform_densities(shapes, density, dense)
    raise ValueError(f"sparse init must be one of {SPARSE_INITS}, got {method!r}")


def active_count(density: float, numel: int) -> int:
    """Active weights per branch of a layer of ``numel`` weights per branch: round(density * numel), at least 1."""
    return min(numel, max(1, round(density * numel)))


def random_mask(numel: int, active: int, generator: torch.Generator) -> Tensor:
    """A flat boolean mask of ``numel`` positions with exactly ``active`` True, chosen uniformly at random."""
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:active]] = True
    return mask
