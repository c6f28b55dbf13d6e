"""Tensor augmentations (no torchvision): random crop with zero padding, horizontal flip, cutout, and batch mixup.

The per-image ops take an explicit ``torch.Generator``, so a view is a pure function of the generator's seed: the
trainer seeds it from (seed, epoch, sample index), which makes the views independent of worker count, process
count (DDP rank split) and resume point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(img: Tensor, padding: int, g: torch.Generator) -> Tensor:
    """Pad ``(C, H, W)`` by ``padding`` zeros on each side and crop a random ``H x W`` window (a random shift)."""
    if padding <= 0:
        return img
    _, h, w = img.shape
    padded = F.pad(img, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=g).tolist()
    return padded[:, top : top + h, left : left + w]


def random_flip(img: Tensor, g: torch.Generator) -> Tensor:
    """Mirror ``(C, H, W)`` left-right with probability 1/2."""
    if torch.rand((), generator=g).item() < 0.5:
        return img.flip(-1)
    return img


def cutout(img: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Zero a ``size x size`` square at a random centre, clipped at the border (DeVries & Taylor, 2017)."""
    if size <= 0:
        return img
    _, h, w = img.shape
    cy = int(torch.randint(0, h, (), generator=g))
    cx = int(torch.randint(0, w, (), generator=g))
    y0, y1 = max(cy - size // 2, 0), min(cy - size // 2 + size, h)
    x0, x1 = max(cx - size // 2, 0), min(cx - size // 2 + size, w)
    out = img.clone()
    out[:, y0:y1, x0:x1] = 0
    return out


@dataclass(frozen=True)
class Augment:
    """The training augmentation of one view: crop (zero padding ``padding``), optional flip, optional cutout.

    Applied to an image in [0, 1] before normalisation, so padding and cutout are black.
    """

    padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        img = random_crop(img, self.padding, g)
        if self.flip:
            img = random_flip(img, g)
        return cutout(img, self.cutout, g)


def mixup(x: Tensor, y: Tensor, num_classes: int, alpha: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Mix a batch with a shuffled copy of itself (Zhang et al., 2018); returns the mixed batch and soft targets.

    One lambda ~ Beta(alpha, alpha) and one permutation for the whole batch, so every branch's view of image i is
    mixed with the same partner by the same amount (per-view mixing would give branches different targets).
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    return lam * x + (1 - lam) * x[perm], lam * one_hot + (1 - lam) * one_hot[perm]


def cutmix(x: Tensor, y: Tensor, num_classes: int, alpha: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Paste a box of a shuffled copy of the batch into it (Yun et al., 2019); returns the batch and soft targets.

    One lambda ~ Beta(alpha, alpha), one box of area about ``(1 - lambda)`` of the image (centre uniform, clipped
    at the border) and one permutation for the whole batch and every branch's view; the target weight is the area
    actually kept, ``1 - box area / image area``.
    """
    if alpha <= 0:
        raise ValueError(f"cutmix alpha must be > 0, got {alpha}")
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (h * w)
    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    return out, kept * one_hot + (1 - kept) * one_hot[perm]
