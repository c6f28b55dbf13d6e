"""The names the command line offers, as literal tuples, so that ``--help`` builds without importing torch.

Each tuple mirrors the registry that owns the names (named beside it); ``tests/test_cli_help.py`` checks that they
are equal, so a new model, data set or method added to its registry must be added here too. Nothing here may import
torch or any groupnet module that does.
"""

from __future__ import annotations

#: groupnet.models.registry.MODELS (the named zoo models; the patterns wrn-D-k, resnetD, resnextD-CxWd take others).
MODEL_NAMES = (
    "small_cnn", "mobilenetv2_tiny", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet164",
    "wrn-16-4", "wrn-16-8", "wrn-28-10", "wrn-40-10", "resnext29-8x64d", "resnext29-16x64d",
    "splitnet-wrn-28-10", "splitnet-resnet110", "splitnet-resnext29-8x64d",
)
#: groupnet.data.registry.DATASETS
DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "folder")
#: groupnet._checks.DIVERGENCES
DIVERGENCES = ("js", "kl")
#: groupnet.branch_major.EXECUTION_ORDERS
EXECUTION_ORDERS = ("auto", "grouped", "branch")
#: groupnet.sparse.SPARSE_INITS
SPARSE_INITS = ("erk", "uniform")
#: groupnet.sparse.DST_METHODS
DST_METHODS = ("static", "set", "rigl")
#: groupnet.sparse.DROP_SCHEDULES
DROP_SCHEDULES = ("cosine", "constant")
#: groupnet.data.augment.RECIPES
RECIPES = ("basic", "splitnet-cifar")
#: groupnet.data.augment.RECIPE_MIXUP: the mixup alpha a recipe sets when the run does not give --mixup-alpha
RECIPE_MIXUP = {"basic": 0.0, "splitnet-cifar": 0.2}
