"""In-Time Over-Parameterization statistics: the ITOP rate R_s and the masks' diversity across branches.

- **R_s** of a branch: the fraction of its maskable weights that have ever been active since initialisation
  (``Masking.fired``, the running OR of every mask). It starts at the density and never decreases; a static mask
  keeps it at the density.
- **union R_s**: the fraction of one branch's weight positions that have been active in ANY branch at some time,
  the ensemble's exploration of the parameter space of one network.
- **overlap**: the Jaccard index ``|A and B| / |A or B|`` of two branches' current masks (over all masked layers),
  1 for identical masks; the mean over pairs measures how different the branches' connectivity is.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from groupnet.sparse.masks import Masking

__all__ = ["ItopStats", "itop_stats"]


@dataclass(frozen=True)
class ItopStats:
    """ITOP statistics of a :class:`Masking` at one moment."""

    #: Active fraction of each branch's masked weights, ``[K]``.
    density: list[float]
    #: R_s of each branch, ``[K]``.
    itop_rate: list[float]
    #: Fraction of one branch's positions ever active in any branch.
    itop_rate_union: float
    #: R_s per layer and branch: ``{layer: [K]}``.
    layer_itop_rate: dict[str, list[float]] = field(default_factory=dict)
    #: Jaccard overlap of the current masks of each branch pair ``(i, j)``, i < j.
    overlap: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def mean_overlap(self) -> float:
        """Mean pairwise overlap (NaN for K = 1)."""
        return sum(self.overlap.values()) / len(self.overlap) if self.overlap else float("nan")

    def as_row(self) -> dict[str, float]:
        """Flat metrics: ``sparse_density``, ``itop_rate_{k}``, ``itop_rate_union``, ``mask_overlap`` (K > 1)."""
        k = len(self.density)
        row = {"sparse_density": sum(self.density) / k}
        row.update({f"itop_rate_{i}": r for i, r in enumerate(self.itop_rate)})
        row["itop_rate_union"] = self.itop_rate_union
        if self.overlap:
            row["mask_overlap"] = self.mean_overlap
        return row


@torch.no_grad()
def itop_stats(masking: Masking) -> ItopStats:
    """R_s per branch and layer, the union R_s, densities and pairwise overlaps of ``masking``'s masks."""
    k = masking.branches
    active = torch.zeros(k, dtype=torch.float64)
    fired = torch.zeros(k, dtype=torch.float64)
    union = 0
    total = 0
    inter = torch.zeros(k, k, dtype=torch.float64)
    either = torch.zeros(k, k, dtype=torch.float64)
    layer_rate: dict[str, list[float]] = {}
    for w in masking.layers:
        m = masking.branch_view(w.name, masking.masks[w.name]).cpu()
        f = masking.branch_view(w.name, masking.fired[w.name]).cpu()
        active += m.sum(1).double()
        fired += f.sum(1).double()
        union += int(f.any(0).sum())
        total += w.numel
        layer_rate[w.name] = (f.sum(1).double() / w.numel).tolist()
        mf = m.double()
        both = mf @ mf.T
        inter += both
        counts = mf.sum(1)
        either += counts[:, None] + counts[None, :] - both
    overlap = {(i, j): float(inter[i, j] / either[i, j]) if either[i, j] > 0 else 1.0
               for i, j in itertools.combinations(range(k), 2)}
    return ItopStats(density=(active / total).tolist(), itop_rate=(fired / total).tolist(),
                     itop_rate_union=union / total, layer_itop_rate=layer_rate, overlap=overlap)
