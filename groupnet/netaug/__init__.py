"""Network augmentation (NetAug, Cai et al., ICLR 2022) for the K branches of a grouped model.

The tiny model (each branch of the divided network) is trained as the leading slice of wider augmented models
that share its weights; only the tiny model is kept. :func:`make_dynamic` builds the super-model and its
:class:`WidthSpace` (configurations, sampling, channel sorting, static copies); :func:`recalibrate_batchnorm`
re-estimates batch-norm statistics (precise BN). The training step is :mod:`groupnet.training.netaug_hook`.
"""

from groupnet.netaug.bn import recalibrate_batchnorm
from groupnet.netaug.space import (
    DEFAULT_EXPAND_MULTS,
    DEFAULT_WIDTH_MULTS,
    SUPPORTED_FAMILIES,
    WidthChoice,
    WidthSpace,
    check_multipliers,
    check_supported_spec,
    make_dynamic,
    widened_spec,
)

__all__ = [
    "DEFAULT_EXPAND_MULTS",
    "DEFAULT_WIDTH_MULTS",
    "SUPPORTED_FAMILIES",
    "WidthChoice",
    "WidthSpace",
    "check_multipliers",
    "check_supported_spec",
    "make_dynamic",
    "recalibrate_batchnorm",
    "widened_spec",
]
