"""SplitNet's division rules: one large network -> K small ones with about the same total parameters.

Conv parameters grow with C_in*C_out, so dividing the width by sqrt(K) divides a branch's parameters by K. The
SplitNet code (Zhao et al., "Divide and Co-training", model/*.py) writes this as hand-made rules per family; rule
``"splitnet"`` reproduces them:

- WRN-d-k (CIFAR): widen factor k -> int(max(k/sqrt(K) + 0.4, 1)); the stem stays 16 (WRN-28-10 -> 28-7 at K=2,
  28-5 at K=4).
- CIFAR ResNet (basic and bottleneck): base width {1: 16, 2: 12, 4: 8, 8: 6, 16: 4}; the table is
  ``2*round(b/(2*sqrt(K)))`` for base width b=16, and that even-rounding rule gives any other K or b.
- ResNeXt: the cardinality is divided, groups -> groups/K, the width per group kept (ResNeXt-29 8x64d -> 2x 4x64d).
  The stem, the stage output widths and the shortcut projections are not divided, so parameters go up a little.
- The official networks (``splitnet_wrn``, ``splitnet_resnet``, ``splitnet_resnext``,
  :mod:`groupnet.models.splitnet_resnet`) follow the same three rules as their zoo counterparts.
- small_cnn has no SplitNet rule: every width is divided by sqrt(K), as in rule ``"parity"``.
- mobilenetv2 (SplitNet has no rule for it either): every width (stem, stages, head conv) divided by sqrt(K),
  expansion ratios kept; the 1x1 convs then shrink by K, the depthwise convs by sqrt(K) (1.10x total at K=2).

Rule ``"parity"`` divides every width of any spec (stem, stage and bottleneck widths) by sqrt(K), rounded to the
nearest int (bottleneck widths to a multiple of the cardinality, which is kept). It holds the total parameters
within a few percent where the SplitNet rules do not: integer widen factors and even base widths overshoot at some K
(ResNet at K=2: base 12 gives 2*(12/16)^2 = 1.125x the parameters; SplitNet's own ResNet-110 table reports 1.17M ->
1.33M at K=2). ``parameter_table`` prints both.

Regularisation (both rules), as in the SplitNet code: the dropout before the classifier is divided by K
(model/resnet.py, which builds every family here; its senet/efficientnet models divide by sqrt(K) instead), and
block-level drop (WRN's dropout, drop-path) by sqrt(K). Weight decay may be scaled by exp(1/K - 1)
(:func:`split_weight_decay`, the reference's ``--is_div_wd``; "does not always help").
"""

from __future__ import annotations

import math

from groupnet.models.spec import ArchSpec

RULES = ("splitnet", "parity")
WRN_STEM = 16


def split_weight_decay(weight_decay: float, branches: int) -> float:
    """SplitNet's weight decay for K branches: ``wd * exp(1/K - 1)`` (x0.607 at K=2, x0.472 at K=4)."""
    _check_branches(branches)
    return weight_decay * math.exp(1.0 / branches - 1.0)


def split_drop_rate(p: float, branches: int, rule: str = "sqrt") -> float:
    """A dropout / drop-path rate for K branches: ``p/sqrt(K)`` (rule ``"sqrt"``) or ``p/K`` (``"linear"``)."""
    _check_branches(branches)
    if rule == "sqrt":
        return p / math.sqrt(branches)
    if rule == "linear":
        return p / branches
    raise ValueError(f"split_drop_rate rule must be 'sqrt' or 'linear', got {rule!r}")


def wrn_widen_factor(k: int, branches: int) -> int:
    """SplitNet's WRN widen factor for K branches: ``int(max(k/sqrt(K) + 0.4, 1))``."""
    _check_branches(branches)
    return int(max(k / math.sqrt(branches) + 0.4, 1))


def resnet_base_width(base: int, branches: int) -> int:
    """SplitNet's CIFAR ResNet base width for K branches: 16 -> {1: 16, 2: 12, 4: 8, 8: 6, 16: 4}.

    That table is ``2*round(base/(2*sqrt(K)))`` (even widths), used for every K and base; K=1 keeps ``base``.
    """
    _check_branches(branches)
    if branches == 1:
        return base
    return max(2, 2 * round(base / (2 * math.sqrt(branches))))


def divide(spec: ArchSpec, branches: int, rule: str = "splitnet") -> ArchSpec:
    """The per-branch spec of K branches dividing the unsplit network ``spec`` (see the module docstring)."""
    _check_branches(branches)
    if rule not in RULES:
        raise ValueError(f"division rule must be one of {RULES}, got {rule!r}")
    if branches == 1:
        return spec
    if rule == "parity" or spec.family in ("small_cnn", "mobilenetv2"):
        out = scale_widths(spec, 1 / math.sqrt(branches), divisor=1)
    elif spec.family in ("wrn", "splitnet_wrn"):
        out = _divide_wrn(spec, branches)
    elif spec.family in ("resnet", "splitnet_resnet"):
        out = _divide_resnet(spec, branches)
    elif spec.family in ("resnext", "splitnet_resnext"):
        out = _divide_resnext(spec, branches)
    else:
        raise ValueError(f"no SplitNet division rule for family {spec.family!r}; use rule='parity'")
    return out.replace(drop_rate=split_drop_rate(spec.drop_rate, branches, "linear"),
                       block_drop_rate=split_drop_rate(spec.block_drop_rate, branches, "sqrt"))


def round_width(w: float, divisor: int = 1) -> int:
    """``w`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(round(w / divisor)) * divisor)


def scale_widths(spec: ArchSpec, factor: float, divisor: int = 1) -> ArchSpec:
    """Every width of ``spec`` times ``factor``, rounded to ``divisor``; bottleneck widths to a multiple of
    ``lcm(divisor, groups)`` (the cardinality is kept, so the width per group scales); expansion ratios kept."""
    mids = None
    if spec.mid_widths is not None:
        d = math.lcm(divisor, spec.groups)
        mids = tuple(round_width(m * factor, d) for m in spec.mid_widths)
    head = None if spec.head_width is None else round_width(spec.head_width * factor, divisor)
    return spec.replace(stem_width=round_width(spec.stem_width * factor, divisor),
                        widths=tuple(round_width(w * factor, divisor) for w in spec.widths), mid_widths=mids,
                        head_width=head)


def _divide_wrn(spec: ArchSpec, branches: int) -> ArchSpec:
    k = spec.widths[0] // 16
    if spec.widths != (16 * k, 32 * k, 64 * k) or spec.stem_width != WRN_STEM:
        raise ValueError(f"the SplitNet WRN rule needs widths (16k, 32k, 64k) and stem 16, got {spec.describe()}; "
                         "use rule='parity'")
    k2 = wrn_widen_factor(k, branches)
    return spec.replace(widths=(16 * k2, 32 * k2, 64 * k2))


def _divide_resnet(spec: ArchSpec, branches: int) -> ArchSpec:
    b = spec.stem_width
    stages = tuple(b * 2**i for i in range(len(spec.widths)))
    b2 = resnet_base_width(b, branches)
    stages2 = tuple(b2 * 2**i for i in range(len(spec.widths)))
    if spec.block == "basic" and spec.widths == stages:
        return spec.replace(stem_width=b2, widths=stages2)
    if spec.block == "bottleneck" and spec.mid_widths == stages and spec.widths == tuple(4 * s for s in stages):
        return spec.replace(stem_width=b2, mid_widths=stages2, widths=tuple(4 * s for s in stages2))
    raise ValueError(f"the SplitNet ResNet rule needs widths (b, 2b, 4b) (bottleneck: mid (b, 2b, 4b), out 4x) with "
                     f"stem b, got {spec.describe()}; use rule='parity'")


def _divide_resnext(spec: ArchSpec, branches: int) -> ArchSpec:
    if spec.groups % branches:
        raise ValueError(f"the SplitNet ResNeXt rule divides the cardinality {spec.groups} by K={branches}, which "
                         "does not divide it; use rule='parity'")
    g = spec.groups // branches
    mids = tuple(m // branches for m in spec.mid_widths)
    return spec.replace(groups=g, mid_widths=mids)


def _check_branches(branches: int) -> None:
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise ValueError(f"branches must be a positive int, got {branches!r}")
