"""Random inputs of the co-training loss: logits in every layout it accepts, hard or soft targets."""

from __future__ import annotations

import torch
from torch import Tensor

LOGIT_LAYOUTS = ("nkc", "nkc_strided", "knc", "knc_permuted")
TARGET_KINDS = ("hard", "hard_ignore", "soft", "soft_view")


def random_logits(n: int, k: int, c: int, layout: str, *, scale: float = 3.0, dtype: torch.dtype = torch.float64,
                  seed: int = 0, row_pad: int = 3) -> Tensor:
    """Normal logits times ``scale``, drawn in float64 and rounded to ``dtype``, in one of ``LOGIT_LAYOUTS``:

    - ``nkc``: ``(N, K*C)``, contiguous;
    - ``nkc_strided``: ``(N, K*C)`` as a column slice of an ``(N, K*C + row_pad)`` buffer (row stride > K*C);
    - ``knc``: ``(K, N, C)``, contiguous;
    - ``knc_permuted``: ``(K, N, C)`` as a permuted view of ``(N, K, C)``.
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "nkc":
        return (torch.randn(n, k * c, generator=g, dtype=torch.float64) * scale).to(dtype)
    if layout == "nkc_strided":
        return (torch.randn(n, k * c + row_pad, generator=g, dtype=torch.float64) * scale).to(dtype)[:, : k * c]
    if layout == "knc":
        return (torch.randn(k, n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    assert layout == "knc_permuted", f"layout must be one of {LOGIT_LAYOUTS}, got {layout!r}"
    return (torch.randn(n, k, c, generator=g, dtype=torch.float64) * scale).to(dtype).permute(1, 0, 2)


def random_targets(n: int, c: int, kind: str, *, seed: int = 0, ignore_index: int = -100,
                   ignore_fraction: float = 0.4, dtype: torch.dtype = torch.float64, seed_offset: int = 1) -> Tensor:
    """Targets for ``n`` samples of ``c`` classes, of one of ``TARGET_KINDS``:

    - ``hard``: class indices;
    - ``hard_ignore``: class indices, about ``ignore_fraction`` of them set to ``ignore_index``;
    - ``soft``: probability rows (softmax of normals times 2), contiguous, in ``dtype``;
    - ``soft_view``: uniform [0, 1) rows as a column slice of an ``(n, c + 2)`` float64 buffer (non-contiguous), each
      row normalised to sum 1 for even seeds and left unnormalised for odd seeds (the loss is linear in the target:
      the CE gradient ``P * sum(q) - q`` holds for any ``q``).

    The generator is seeded with ``seed + seed_offset``, so logits and targets drawn with one seed differ.
    """
    g = torch.Generator().manual_seed(seed + seed_offset)
    if kind == "soft":
        return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, dim=-1).to(dtype)
    if kind == "soft_view":
        t = torch.rand(n, c + 2, generator=g, dtype=torch.float64)[:, :c]
        return (t if seed % 2 else t / t.sum(-1, keepdim=True)).to(dtype)
    assert kind in ("hard", "hard_ignore"), f"kind must be one of {TARGET_KINDS}, got {kind!r}"
    y = torch.randint(0, c, (n,), generator=g)
    if kind == "hard_ignore":
        y[torch.rand(n, generator=g) < ignore_fraction] = ignore_index
    return y
