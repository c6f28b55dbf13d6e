"""Ensemble prediction from the K branches' logits, and the per-branch view of those logits.

Every mode returns log-space scores ``s`` of shape ``(N, C)`` such that ``softmax(s)`` is the ensemble's predictive
distribution, so ``s.argmax(-1)`` is the prediction and ``F.cross_entropy(s, y)`` its loss, whatever the mode:

- ``"logits"`` (SplitNet's default): the mean of the branch logits, ``mean_k z_k``. These are logits, not
  normalised; ``softmax`` gives the probabilities.
- ``"probs"`` (Packed-Ensembles' choice): the mean of the branch probabilities, returned as normalised
  log-probabilities ``log(mean_k softmax(z_k))``; ``exp`` gives the probabilities.
- ``"geometric"`` (SplitNet's latency script): the normalised geometric mean of the branch probabilities, returned
  as normalised log-probabilities ``mean_k log softmax(z_k) - logsumexp_c(mean_k log softmax(z_k))``. (SplitNet takes
  the square root of the product whatever K; its argmax is the same.)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from groupnet.layout import unstack

EnsembleMode = Literal["logits", "probs", "geometric"]
MODES = ("logits", "probs", "geometric")


def split_branches(logits: Tensor, branches: int) -> Tensor:
    """The ``(K, N, C)`` view of branch logits given as ``(N, K*C)`` (or already ``(K, N, C)``, returned as is).

    ``split_branches(logits, K)[k]`` is branch k's own prediction. No copy is made.
    """
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
    if logits.dim() == 2:
        if logits.shape[1] == 0 or logits.shape[1] % branches:
            raise ValueError(
                f"expected logits (N, K*C) with K={branches}: width {logits.shape[1]} is not a positive multiple "
                f"of {branches}"
            )
        return unstack(logits, branches)
    if logits.dim() == 3:
        if logits.shape[0] != branches:
            raise ValueError(f"expected logits (K, N, C) with K={branches}, got shape {tuple(logits.shape)}")
        return logits
    raise ValueError(f"expected logits (N, K*C) or (K, N, C), got shape {tuple(logits.shape)}")


def ensemble(logits: Tensor, branches: int, mode: EnsembleMode = "logits") -> Tensor:
    """Combine K branches' logits (``(N, K*C)`` or ``(K, N, C)``) into ``(N, C)`` ensemble scores.

    See the module docstring for what each ``mode`` returns; in every mode ``softmax`` of the result is the
    ensemble's predictive distribution and ``argmax`` its prediction. Differentiable.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not logits.is_floating_point():
        raise TypeError(f"ensemble expects floating-point logits, got {logits.dtype}")
    per_branch = split_branches(logits, branches)
    if mode == "logits":
        return per_branch.mean(0)
    log_p = torch.log_softmax(per_branch, dim=-1)
    if mode == "probs":
        return torch.logsumexp(log_p, dim=0) - math.log(branches)
    mean_log_p = log_p.mean(0)
    return mean_log_p - torch.logsumexp(mean_log_p, dim=-1, keepdim=True)
