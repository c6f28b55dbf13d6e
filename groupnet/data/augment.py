"""Training augmentation on batches, built on kornia: random crop with zero padding, horizontal flip, AutoAugment,
cutout, random erasing; and batch mixup and cutmix.

A view pipeline (:class:`Augment`) takes images ``(N, C, H, W)`` in [0, 1] and returns K independently augmented,
normalised views of each, ``(N, K*C, H, W)`` with view k in channels ``[k*C, (k+1)*C)``, drawn as one batch: the
images repeated K times along dim 0, one pass of the pipeline (every row draws its own parameters), reshaped. It
runs on any device (kornia's ops are batched tensor ops); its random draws come from one ``torch.Generator`` the
caller passes, so the views are a pure function of that generator's seed. The trainer seeds one generator per
loader batch from (seed, epoch, the batch's sample indices) (:mod:`groupnet.data.views`), which makes the views
independent of worker count and resume point.

Named recipes (:data:`RECIPES`, :func:`recipe_augment`) say which steps a run uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: The augmentation recipes a run can name (``--recipe``).
#:
#: - ``basic``: random crop (the data set's padding) and, where the data set allows it, a horizontal flip.
#: - ``splitnet-cifar``: the official SplitNet CIFAR recipe: crop (padding 4 on CIFAR), flip, AutoAugment with the
#:   CIFAR-10 policy (a sub-policy per image, among 4 drawn per batch: :class:`Augment`), random erasing (p 0.5, a
#:   near-square box of 12.5-20% of the image on CIFAR-10, 6.25-10% on CIFAR-100, filled with 0 after
#:   normalisation) and mixup (alpha 0.2).
RECIPES = ("basic", "splitnet-cifar")
#: The mixup alpha a recipe sets when the run does not give ``--mixup-alpha`` itself.
RECIPE_MIXUP = {"basic": 0.0, "splitnet-cifar": 0.2}


def _kornia():
    try:
        import kornia.augmentation as ka
    except ImportError:
        raise ImportError("groupnet's training augmentation uses kornia, which is not installed: pip install kornia "
                          "(part of groupnet's train extra)") from None
    return ka


def check_recipe(name: str) -> None:
    """Raise ValueError naming the known recipes if ``name`` is not one."""
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {', '.join(RECIPES)}")


@dataclass(frozen=True)
class Augment:
    """The training augmentation of a view, in this order: crop (zero padding ``padding``), optional horizontal
    flip, optional AutoAugment (``autoaugment``: a kornia policy name, ``"cifar10"``, ``"imagenet"`` or ``"svhn"``;
    see ``policy_groups``), optional cutout (a ``cutout`` x ``cutout`` black square, centre uniform,
    clipped at the border), normalisation, optional random erasing (probability ``erasing``; box area fraction in
    ``erasing_scale``, aspect ratio in ``erasing_ratio``, filled with 0, i.e. the data set's mean).

    Padding and cutout act on the image in [0, 1], so they are black.

    ``policy_groups``: AutoAugment draws ``policy_groups`` sub-policies (uniformly, with repetition) per batch and
    each row one of those, so each row's sub-policy is uniform over the policy as in the official recipe (one per
    image), while a batch costs at most ``policy_groups`` kornia passes instead of one per sub-policy present (25
    for the CIFAR-10 policy, each pass 5-10 ms of framework overhead on a CPU). ``None``: a sub-policy drawn per
    row independently.
    """

    padding: int = 0
    flip: bool = False
    cutout: int = 0
    autoaugment: str | None = None
    policy_groups: int | None = 4
    erasing: float = 0.0
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        if self.padding < 0 or self.cutout < 0:
            raise ValueError(f"padding and cutout must be >= 0, got {self.padding} and {self.cutout}")
        if not 0 <= self.erasing <= 1:
            raise ValueError(f"erasing probability must be in [0, 1], got {self.erasing}")
        if self.policy_groups is not None and self.policy_groups < 1:
            raise ValueError(f"policy_groups must be >= 1 or None, got {self.policy_groups}")
        if self.autoaugment not in (None, "cifar10", "imagenet", "svhn"):
            raise ValueError(f"unknown AutoAugment policy {self.autoaugment!r}; choose cifar10, imagenet or svhn")

    def views(self, images: Tensor, k: int, mean: Sequence[float], std: Sequence[float],
              generator: torch.Generator) -> Tensor:
        """K augmented, normalised views of each image: ``(N, C, H, W)`` in [0, 1] -> ``(N, K*C, H, W)``.

        One batch of N*K rows (image i repeated K times) goes through the pipeline once, each row with its own
        random parameters, all drawn from ``generator`` (a CPU generator; ``images`` may be on any device).
        Shape, dtype and device are kept.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if k < 1:
            raise ValueError(f"views must be >= 1, got {k}")
        n, c, h, w = images.shape
        x = images.repeat_interleave(k, dim=0)  # row i*K + j: view j of image i
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        # kornia draws its parameters from torch's global CPU generator: seed it from ours, and leave it as it was
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            x = self._apply(x, mean, std)
        return x.reshape(n, k * c, h, w)

    def _apply(self, x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
        dtype = x.dtype
        _, c, h, w = x.shape
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need one value per channel ({c}), got {len(mean)} and {len(std)}")
        steps = _steps(self, h, w)
        x = x.float()
        if steps.crop is not None:
            x = steps.crop(x)
        if steps.flip is not None:
            x = steps.flip(x)
        if steps.policies is not None:
            x = _per_row_policy(x, steps.policies, self.policy_groups)
        if self.cutout > 0:
            x = _cutout(x, self.cutout)
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
        if steps.erasing is not None:
            x = steps.erasing(x)
        return x.to(dtype)


@dataclass
class _Steps:
    crop: object | None
    flip: object | None
    policies: list | None
    erasing: object | None


@functools.lru_cache(maxsize=32)
def _steps(aug: Augment, h: int, w: int) -> _Steps:
    """The kornia modules of ``aug`` for ``h x w`` images (built once per process)."""
    ka = _kornia()
    crop = (ka.RandomCrop((h, w), padding=aug.padding, fill=0, padding_mode="constant", p=1.0)
            if aug.padding > 0 else None)
    flip = ka.RandomHorizontalFlip(p=0.5) if aug.flip else None
    policies = list(ka.auto.AutoAugment(aug.autoaugment).children()) if aug.autoaugment else None
    erasing = (ka.RandomErasing(p=aug.erasing, scale=aug.erasing_scale, ratio=aug.erasing_ratio, value=0.0)
               if aug.erasing > 0 else None)
    return _Steps(crop, flip, policies, erasing)


def _per_row_policy(x: Tensor, policies: list, groups: int | None) -> Tensor:
    """Each row through a sub-policy of its own (kornia's AutoAugment draws one for the whole batch; the official
    CIFAR recipe, torchvision-style AutoAugment on PIL images, draws one per image): one kornia call per sub-policy
    present, on its rows. With ``groups``, the rows choose among that many sub-policies drawn for the batch."""
    gray = x.shape[1] == 1
    if gray:  # the colour ops need RGB: a gray image as three equal channels stays gray under every op
        x = x.expand(-1, 3, -1, -1)
    if groups is None:
        pick = torch.randint(0, len(policies), (x.shape[0],))
    else:
        drawn = torch.randint(0, len(policies), (groups,))
        pick = drawn[torch.randint(0, groups, (x.shape[0],))]
    out = torch.empty_like(x)
    for i in pick.unique().tolist():
        rows = (pick == i).nonzero().flatten().to(x.device)
        out[rows] = policies[i](x[rows])
    return out[:, :1] if gray else out


def _cutout(x: Tensor, size: int) -> Tensor:
    """Zero a ``size x size`` square at a random centre per row, clipped at the border (DeVries & Taylor, 2017)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,)).to(x.device).view(n, 1, 1)
    cx = torch.randint(0, w, (n,)).to(x.device).view(n, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - size // 2, cx - size // 2
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def cutout(img: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Zero a ``size x size`` square at a random centre of ``(C, H, W)``, clipped at the border."""
    if size <= 0:
        return img
    seed = int(torch.randint(0, 2**62, (), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return _cutout(img.unsqueeze(0), size)[0]


def recipe_augment(recipe: str, dataset: str, *, padding: int, flip: bool, cutout: int = 0) -> Augment:
    """The :class:`Augment` of a named recipe on a data set, with the data set's (or the run's) crop padding and
    flip. On the 1-channel digit sets the flip stays off (a mirrored 2, 3 or 7 is no longer that digit) and
    AutoAugment sees the gray image as three equal channels (its colour op is then the identity)."""
    check_recipe(recipe)
    if recipe == "basic":
        return Augment(padding=padding, flip=flip, cutout=cutout)
    scale = (0.0625, 0.1) if dataset == "cifar100" else (0.125, 0.2)
    return Augment(padding=padding, flip=flip, cutout=cutout, autoaugment="cifar10", erasing=0.5,
                   erasing_scale=scale, erasing_ratio=(0.99, 1.0))


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
