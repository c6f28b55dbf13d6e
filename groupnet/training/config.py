"""The trainer's options in two kinds, their command-line parser, config files (YAML or TOML) and validation.

A :class:`TrainRecipe` defines the training (model, data, optimisation, co-training, augmentation, execution
order, seed): it is saved in every checkpoint and in the run folder's ``config.json``, and a resumed run restores
it. :class:`RunOptions` say how one invocation runs (device, loader workers, where to write, whether to only
evaluate): they are never saved, so each invocation starts them from their defaults. The command line and config
files set both kinds with one flat set of option names.

Precedence: built-in defaults < config file (``--config``) < command line. When resuming, the checkpoint's recipe
takes the place of the recipe's defaults, so ``--resume DIR`` alone continues the run as it was configured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# torch-free: the parser is built for --help without importing torch (groupnet.training.choices mirrors the
# registries, checked by tests/test_cli_help.py)
from groupnet.training.choices import (
    DATASETS,
    DIVERGENCES,
    DROP_SCHEDULES,
    DST_METHODS,
    EXECUTION_ORDERS,
    MODEL_NAMES,
    RECIPE_MIXUP,
    RECIPES,
    SPARSE_INITS,
)
from groupnet.training.errors import ConfigError

ENSEMBLE_MODES = ("logits", "probs", "geometric")
#: Training methods: plain co-training, or network augmentation of each branch (groupnet.training.netaug_hook).
METHODS = ("cotrain", "netaug")
LR_SCHEDULES = ("cosine", "constant")
#: Mixed precision of ``--amp``: torch.autocast in bfloat16 (CPU or CUDA) or float16 (CUDA, with gradient scaling).
AMP_MODES = ("bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
#: Recipe fields that define the model a checkpoint holds: a resumed run may not change them.
MODEL_IDENTITY = ("model", "branches", "dataset", "image_size")
#: Former option names, still read from the command line, config files and saved recipes: old name -> new name.
RENAMED = {"schedule": "execution_order"}


@dataclass
class TrainRecipe:
    """What defines a training run; saved with every checkpoint and restored on resume.

    Each field is an option of ``python -m groupnet.train`` (``--help`` says what it means). Fields that could pass
    for per-invocation settings are here because the run depends on them:

    - ``data_dir``: for the ``folder`` data set it is the data itself; a resumed run reads the same data without
      being told again (``--data-dir`` overrides it when the data has moved).
    - ``eval_batch_size``: the per-epoch test metrics in the run's history are computed with it.
    - ``channels_last``, ``execution_order``, ``amp``: they change the rounding of every step.
    - ``sync_bn``: it changes the batch statistics under DDP.
    - ``baseline``: the run includes its K=1 comparison, which a resumed run finishes too.
    """

    # model and data
    model: str = "small_cnn"
    branches: int = 2
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    train_subset: int | None = None
    # optimisation
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 0.05
    lr_schedule: str = "cosine"
    warmup_epochs: float = 2.0
    warmup_lr: float = 0.005
    min_lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    split_weight_decay: bool = True
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adamw" (decoupled weight decay)
    # co-training
    cot_weight: float = 0.5
    cot_warmup_epochs: float = 5.0
    divergence: str = "js"
    ensemble: str = "logits"
    label_smoothing: float = 0.0
    # augmentation (None: the data set's default); the recipe names the pipeline (groupnet.data.augment.RECIPES)
    recipe: str = "basic"
    padding: int | None = None
    flip: bool | None = None
    cutout: int = 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0  # with mixup as well, each step picks one of the two at random
    # weight averaging: an exponential moving average of the weights, evaluated beside the model (0 = off)
    ema_decay: float = 0.0
    # execution
    channels_last: bool | None = None  # None: on where the grouped convs run the Triton kernels on CUDA
    execution_order: str = "auto"
    amp: str | None = None  # None (float32), "bf16" or "fp16"
    sync_bn: bool = True
    seed: int = 0
    baseline: bool | None = None
    # sparse training (groupnet.sparse): density None = dense training; density = fraction of each branch's conv and
    # linear weights kept active (sparsity = 1 - density)
    density: float | None = None
    sparse_init: str = "erk"
    dst: str | None = None  # None: "rigl" when --density is given
    update_interval: int = 100
    drop_rate: float = 0.5
    drop_schedule: str = "cosine"
    update_until: float = 0.75
    dense_first_last: bool = False
    # training method: network augmentation (NetAug) trains each branch as the leading slice of wider models
    method: str = "cotrain"
    netaug_width: tuple[float, ...] = (1.0, 1.8, 2.6)
    netaug_expand: tuple[float, ...] = (1.0, 1.6, 2.2, 2.8)
    netaug_alpha: float = 1.0
    netaug_stop: float = 0.5
    netaug_sort: bool = True
    netaug_bn_images: int = 2000

    def __post_init__(self) -> None:
        for name in ("netaug_width", "netaug_expand"):  # lists (JSON, YAML, a saved recipe) held as tuples
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON values (tuples as lists), as ``config.json`` and the checkpoint hold it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def replace(self, **changes: Any) -> TrainRecipe:
        return dataclasses.replace(self, **changes)


@dataclass
class RunOptions:
    """How one invocation runs; never saved, so a resumed or evaluated run starts these from their defaults.

    - ``device``: the machine at hand (a checkpoint moves between machines).
    - ``workers``: loader processes; the result does not depend on them (every sample is seeded).
    - ``threads``: torch intra-op threads, a matter of the machine and its load.
    - ``output_dir``: where this invocation writes (a resumed run defaults to its checkpoint's folder).
    - ``resume``: the checkpoint this invocation starts from.
    - ``overwrite``: this invocation may replace another run's checkpoints.
    - ``evaluate``: this invocation only evaluates the ``resume`` checkpoint.
    - ``export_branches``: this invocation also writes each branch as a torch.export program.
    - ``export_ensemble``: this invocation also writes the whole ensemble as one torch.export program.
    - ``print_config``: this invocation prints the recipe it resolved (as ``config.json``) and runs nothing.
    - ``progress``: progress bars (None: tqdm shows them on a terminal only).
    - ``tensorboard``: this invocation also writes the metrics as TensorBoard scalars (``tensorboard/``).
    - ``dist_timeout``: seconds a process waits for the others in a collective before the run fails (None: 180
      on CPU, 600 on CUDA); only used with several processes.
    - ``branch_parallel``: B, the ranks the K branches are spread over (:mod:`groupnet.training.branch_parallel`);
      the other factor of the world size is data parallelism. A layout, not part of the model: a checkpoint holds
      the full model and resumes in any layout.
    """

    device: str = "auto"
    workers: int = 2
    threads: int | None = None
    output_dir: str | None = None
    resume: str | None = None
    overwrite: bool = False
    evaluate: bool = False
    export_branches: bool = False
    export_ensemble: bool = False
    print_config: bool = False
    progress: bool | None = None
    tensorboard: bool = False
    dist_timeout: float | None = None
    branch_parallel: int = 1

    def replace(self, **changes: Any) -> RunOptions:
        return dataclasses.replace(self, **changes)


_RECIPE_FIELDS = {f.name: f for f in fields(TrainRecipe)}
_RUN_FIELDS = {f.name: f for f in fields(RunOptions)}
_FIELDS = {**_RECIPE_FIELDS, **_RUN_FIELDS}


def _expected_types(name: str) -> tuple[type, ...]:
    ann = str(_FIELDS[name].type)
    types: list[type] = []
    for part in ann.split("|"):
        part = part.strip()
        types += {"int": [int], "float": [float, int], "str": [str], "bool": [bool], "None": [type(None)],
                  "tuple[float, ...]": [tuple, list]}[part]
    return tuple(types)


def coerce(name: str, value: Any, source: str) -> Any:
    """Check one option's type (ints are accepted for floats); raise ConfigError naming the source."""
    if name not in _FIELDS:
        raise ConfigError(f"{source}: unknown option {name!r}; known options: {', '.join(sorted(_FIELDS))}")
    types = _expected_types(name)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok and float in types and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-2 as a string: it needs a dot (1.0e-2); a number in a string is meant as one
        try:
            return float(value)
        except ValueError:
            pass
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{source}: option {name!r} must be {want}, got {value!r}")
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in types:  # a list of numbers (command line, config file, JSON): a tuple of floats
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{source}: option {name!r} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    return value


def _deprecation_note(old: str, new: str) -> None:
    print(f"groupnet.train: {old} is deprecated, use {new} (same values)", file=sys.stderr)


def renamed(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with former option names replaced by their new ones (the new name wins when both are given).

    A value under a former name is checked here, so an error names the option as it was written.
    """
    out = dict(options)
    if "amp" in out:
        out["amp"] = _amp_value(out["amp"])
    for old, new in RENAMED.items():
        if old not in out:
            continue
        value = out.pop(old)
        if old == "schedule" and value not in EXECUTION_ORDERS:
            raise ConfigError(f"--schedule must be one of {EXECUTION_ORDERS}, got {value!r}")
        out.setdefault(new, value)
    return out


def _amp_value(value: Any) -> Any:
    """``amp`` as it is stored now: the former boolean (True was float16 autocast on CUDA) and "none" map to the
    mode they meant; anything else is left for the type check and validation."""
    if value is True:
        return "fp16"
    if value is False or value == "none":
        return None
    return value


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the recipe's options, the run options) of a flat dict of options; former names are renamed first."""
    options = renamed(options)
    unknown = set(options) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}")
    recipe = {k: v for k, v in options.items() if k in _RECIPE_FIELDS}
    run = {k: v for k, v in options.items() if k in _RUN_FIELDS}
    return recipe, run


def saved_recipe(saved: dict[str, Any]) -> dict[str, Any]:
    """The recipe in a checkpoint's saved options.

    Flat configs that also hold run options (and ``schedule`` for ``execution_order``) are split: the run options
    are dropped. Names this groupnet does not know (saved by a newer one) are dropped too; missing fields take their
    defaults when the recipe is built.
    """
    return {k: v for k, v in renamed(saved).items() if k in _RECIPE_FIELDS}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``, such as a run folder's
    ``config.json``) file; keys may use ``-`` or ``_``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, got {type(raw).__name__}")
    options = {k.replace("-", "_"): v for k, v in raw.items()}
    for old, new in RENAMED.items():
        if old in options:
            _deprecation_note(f"option {old!r} in config file {path}", repr(new))
    options = renamed(options)
    return {k: coerce(k, v, f"config file {path}") for k, v in options.items()}


class _DeprecatedAlias(argparse.Action):
    """A former option name: stores into the new option's destination and prints a deprecation note."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _deprecation_note(str(option_string), self.new)
        setattr(namespace, self.dest, values)


def _model_names() -> list[str]:
    return list(MODEL_NAMES)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option defaults to 'not given' so config files and checkpoints can fill in."""
    d, r = TrainRecipe(), RunOptions()
    p = argparse.ArgumentParser(
        prog="python -m groupnet.train",
        description="Co-train K branches of a divided network as one grouped model (SplitNet), report per-branch "
        "and ensemble accuracy. With no arguments: digits, small_cnn, K=2, plus the K=1 baseline.",
        argument_default=argparse.SUPPRESS,  # absent options stay absent: config files and checkpoints fill in
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--config", help="YAML, TOML or JSON file setting any option below (the command line wins); a "
                   "run folder's config.json repeats that run")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved training options as JSON (the config.json format) and exit")
    g.add_argument("--model", help=f"architecture: {', '.join(_model_names())}, or pkg.module:Class for a plain "
                   f"model of one's own, built K times and stacked [{d.model}]")
    g.add_argument("--branches", "-K", type=int, help=f"K, the number of branches [{d.branches}]")
    g.add_argument("--dataset", choices=DATASETS, help=f"data set [{d.dataset}]")
    g.add_argument("--data-dir", help="folder holding the data set (cifar-10-batches-py/, cifar-100-python/, or "
                   "train/ and test/ class folders); digits needs none")
    g.add_argument("--image-size", type=int, help="folder data set: images are resized to this square size [32]")
    g.add_argument("--train-subset", type=int, help="train on N training images only, a stratified pick that is the "
                   "same for every seed (quick checks)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"[{d.epochs}]")
    g.add_argument("--batch-size", type=int, help=f"global batch size, over all processes [{d.batch_size}]")
    g.add_argument("--eval-batch-size", type=int, help=f"[{d.eval_batch_size}]")
    g.add_argument("--lr", type=float, help=f"peak learning rate [{d.lr}]")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help=f"after the warm-up [{d.lr_schedule}]")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warm-up from --warmup-lr to --lr [{d.warmup_epochs}]")
    g.add_argument("--warmup-lr", type=float, help=f"[{d.warmup_lr}]")
    g.add_argument("--min-lr", type=float, help=f"final learning rate of the cosine schedule [{d.min_lr}]")
    g.add_argument("--momentum", type=float, help=f"[{d.momentum}]")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help=f"Nesterov momentum [{d.nesterov}]")
    g.add_argument("--weight-decay", type=float,
                   help=f"weight decay, not applied to norm layers and biases [{d.weight_decay}]")
    g.add_argument("--split-weight-decay", action=argparse.BooleanOptionalAction,
                   help=f"scale weight decay by exp(1/K - 1) (SplitNet) [{d.split_weight_decay}]")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"sgd (--momentum, --nesterov) or adamw (decoupled weight decay) [{d.optimizer}]")
    g.add_argument("--ema-decay", type=float, help="also keep an exponential moving average of the weights with "
                   f"this decay (e.g. 0.999) and report its test accuracy; 0 = off [{d.ema_decay}]")
    g = p.add_argument_group("co-training")
    g.add_argument("--cot-weight", type=float, help=f"weight of the divergence term [{d.cot_weight}]")
    g.add_argument("--cot-warmup-epochs", type=float,
                   help=f"linear ramp of the weight from 0.005 [{d.cot_warmup_epochs}]")
    g.add_argument("--divergence", choices=DIVERGENCES, help=f"co-training divergence [{d.divergence}]")
    g.add_argument("--ensemble", choices=ENSEMBLE_MODES, help=f"how branch outputs are combined [{d.ensemble}]")
    g.add_argument("--label-smoothing", type=float,
                   help=f"label smoothing of each branch's cross-entropy, in [0, 1) [{d.label_smoothing}]")
    g = p.add_argument_group("augmentation")
    g.add_argument("--padding", type=int, help="random-crop zero padding [data set default: digits 1, CIFAR 4]")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flip [data set default: off for digits, on otherwise]")
    g.add_argument("--cutout", type=int, help=f"cutout square side, 0 = off [{d.cutout}]")
    g.add_argument("--mixup-alpha", type=float, help=f"mixup Beta(alpha, alpha), 0 = off [{d.mixup_alpha}]")
    g.add_argument("--cutmix-alpha", type=float,
                   help=f"cutmix Beta(alpha, alpha), 0 = off; with --mixup-alpha each step picks one [{d.cutmix_alpha}]")
    g = p.add_argument_group("augmentation recipe")
    g.add_argument("--recipe", choices=RECIPES,
                   help="the augmentation pipeline by name: basic = random crop + flip (flip only where the data set "
                   "allows it: not on digits/mnist5k); splitnet-cifar = the official SplitNet CIFAR recipe: crop + "
                   "flip + AutoAugment (CIFAR-10 policy, per image) + random erasing (p 0.5) + mixup (alpha 0.2 "
                   "unless --mixup-alpha is given) [basic]")
    g = p.add_argument_group("network augmentation (--method netaug)")
    g.add_argument("--method", choices=METHODS,
                   help=f"training method: plain co-training, or network augmentation (NetAug) of each tiny branch "
                   f"[{d.method}]")
    g.add_argument("--netaug-width", type=float, nargs="+",
                   help=f"width multipliers of the augmented models, >= 1, including 1 "
                   f"[{' '.join(f'{v:g}' for v in d.netaug_width)}]")
    g.add_argument("--netaug-expand", type=float, nargs="+",
                   help=f"expansion-ratio multipliers of inverted bottlenecks, >= 1, including 1 "
                   f"[{' '.join(f'{v:g}' for v in d.netaug_expand)}]")
    g.add_argument("--netaug-alpha", type=float, help=f"weight of the augmented model's loss [{d.netaug_alpha:g}]")
    g.add_argument("--netaug-stop", type=float,
                   help=f"fraction of training after which width augmentation stops [{d.netaug_stop:g}]")
    g.add_argument("--netaug-sort", action=argparse.BooleanOptionalAction,
                   help=f"sort inner channels by L1 importance every epoch [{d.netaug_sort}]")
    g.add_argument("--netaug-bn-images", type=int,
                   help=f"training images that re-estimate BN statistics before each evaluation [{d.netaug_bn_images}]")
    g = p.add_argument_group("execution")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels_last activations and weights [on where the grouped convs run the Triton kernels on "
                   "CUDA, whose NCHW loads are gathers; off otherwise]")
    g.add_argument("--execution-order", choices=EXECUTION_ORDERS,
                   help=f"run the K branches layer by layer together (grouped) or one after another (branch); auto "
                   f"picks branch on CPU when the branches' activations outgrow the cache [{d.execution_order}]")
    g.add_argument("--schedule", dest="execution_order", choices=EXECUTION_ORDERS, action=_DeprecatedAlias,
                   new="--execution-order", help=argparse.SUPPRESS)
    g.add_argument("--amp", nargs="?", const="fp16", choices=(*AMP_MODES, "none"),
                   help="mixed precision: bf16 autocast (CPU or CUDA), fp16 autocast with gradient scaling (CUDA), "
                   "none; --amp alone is fp16 [none]")
    g.add_argument("--no-amp", dest="amp", action="store_const", const="none", help=argparse.SUPPRESS)
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help=f"synchronise batch-norm statistics across processes under DDP [{d.sync_bn}]")
    g.add_argument("--device", help=f"auto, cpu, cuda or cuda:N [{r.device}]")
    g.add_argument("--workers", type=int, help=f"DataLoader worker processes [{r.workers}]")
    g.add_argument("--threads", type=int, help="torch intra-op threads [data set default: 1 for digits (its 8x8 "
                   "ops are too small to split, and spinning threads fight the loader workers), torch's otherwise]")
    g.add_argument("--seed", type=int, help=f"[{d.seed}]")
    g.add_argument("--branch-parallel", type=int, metavar="B",
                   help="spread the K branches over B ranks (B divides K and the number of processes; the rest is "
                   f"data parallelism), under torchrun --nproc_per_node P [{r.branch_parallel}]")
    g = p.add_argument_group("run management")
    g.add_argument("--output-dir", "-o", help="run folder [runs/<dataset>-<model>-k<K>-<time>]")
    g.add_argument("--resume", help="continue from a checkpoint file or a run folder (its last.pt)")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                   help="allow a fresh run in a folder that already holds checkpoints")
    g.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--export-branches", action="store_true",
                   help="write each branch as a standalone torch.export program (export/branch_k.pt2)")
    g.add_argument("--export-ensemble", action="store_true",
                   help="write the whole ensemble (images -> ensemble scores) as one torch.export program "
                   "(export/ensemble.pt2)")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction,
                   help="also train the K=1 baseline and compare [on for digits, off otherwise]")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bars [on a terminal only]")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="also write the metrics as TensorBoard scalars into RUN/tensorboard (needs tensorboard)")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="with several processes: how long they wait for one that stopped responding before the run "
                   "fails [180 on CPU, 600 on CUDA]")
    g = p.add_argument_group("sparse training (per-branch masks, dynamic sparse training, ITOP)")
    g.add_argument("--density", type=float, help="fraction of each branch's conv and linear weights kept active, in "
                   "(0, 1] (sparsity = 1 - density); not given: dense training")
    g.add_argument("--sparse-init", choices=SPARSE_INITS, help=f"per-layer densities [{d.sparse_init}]")
    g.add_argument("--dst", choices=DST_METHODS, help="mask updates: static (none), set (random regrowth) or rigl "
                   "(gradient regrowth) [rigl]")
    g.add_argument("--update-interval", type=int, help=f"optimizer steps between mask updates [{d.update_interval}]")
    g.add_argument("--drop-rate", type=float,
                   help=f"initial fraction of active weights pruned and regrown per update [{d.drop_rate}]")
    g.add_argument("--drop-schedule", choices=DROP_SCHEDULES,
                   help=f"cosine decay of the drop rate to 0.005 at --update-until, or constant [{d.drop_schedule}]")
    g.add_argument("--update-until", type=float,
                   help=f"fraction of training after which masks stop changing [{d.update_until}]")
    g.add_argument("--dense-first-last", action=argparse.BooleanOptionalAction,
                   help=f"keep the first and the last layer dense [{d.dense_first_last}]")
    return p


def parse_options(argv: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options from the config file, options given on the command line), flat, validated for type."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    from_file = load_config_file(config_path) if config_path else {}
    from_cli = {k: coerce(k, v, "command line") for k, v in args.items()}
    return from_file, from_cli


def make_config(base: dict[str, Any], *overrides: dict[str, Any]) -> tuple[TrainRecipe, RunOptions]:
    """A validated (recipe, run options) pair.

    ``base`` holds recipe fields (the defaults, or a checkpoint's recipe); each override is a flat dict of options
    of either kind, applied in order. Run options start from their defaults.
    """
    recipe = saved_recipe(base)
    run: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for o in overrides:
        o_recipe, o_run = split_options(o)
        given.update(o_recipe)
        run.update(o_run)
    recipe.update(given)
    if given.get("recipe") in RECIPE_MIXUP and "mixup_alpha" not in given:
        recipe["mixup_alpha"] = RECIPE_MIXUP[given["recipe"]]  # a named recipe brings its mixup
    cfg, opts = TrainRecipe(**recipe), RunOptions(**run)
    validate(cfg, opts)
    return cfg, opts


def validate(cfg: TrainRecipe, opts: RunOptions | None = None) -> None:
    """Reject impossible option values with a message naming the option."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.branches >= 1, f"--branches (K) must be >= 1, got {cfg.branches}")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "cot_weight", "warmup_epochs", "cot_warmup_epochs",
                 "mixup_alpha", "cutmix_alpha"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v >= 0, f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    need(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(not (cfg.nesterov and cfg.momentum == 0), "--nesterov needs --momentum > 0")
    need(cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    need(cfg.divergence in DIVERGENCES, f"--divergence must be one of {DIVERGENCES}, got {cfg.divergence!r}")
    need(cfg.ensemble in ENSEMBLE_MODES, f"--ensemble must be one of {ENSEMBLE_MODES}, got {cfg.ensemble!r}")
    need(cfg.execution_order in EXECUTION_ORDERS,
         f"--execution-order must be one of {EXECUTION_ORDERS}, got {cfg.execution_order!r}")
    need(cfg.amp is None or cfg.amp in AMP_MODES, f"--amp must be one of {AMP_MODES} or none, got {cfg.amp!r}")
    need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    need(math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1,
         f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(math.isfinite(cfg.ema_decay) and 0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    need(cfg.dataset in DATASETS, f"--dataset must be one of {DATASETS}, got {cfg.dataset!r}")
    need(cfg.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    need(cfg.padding is None or cfg.padding >= 0, f"--padding must be >= 0, got {cfg.padding}")
    need(cfg.cutout >= 0, f"--cutout must be >= 0, got {cfg.cutout}")
    need(cfg.image_size is None or cfg.image_size >= 1, f"--image-size must be >= 1, got {cfg.image_size}")
    need(cfg.train_subset is None or cfg.train_subset >= 1, f"--train-subset must be >= 1, got {cfg.train_subset}")
    if cfg.density is None:
        need(cfg.dst is None, "--dst needs --density (the fraction of weights kept active)")
    else:
        need(math.isfinite(cfg.density) and 0 < cfg.density <= 1,
             f"--density (fraction of weights kept active; sparsity = 1 - density) must be in (0, 1], got {cfg.density}")
    need(cfg.sparse_init in SPARSE_INITS, f"--sparse-init must be one of {SPARSE_INITS}, got {cfg.sparse_init!r}")
    need(cfg.dst is None or cfg.dst in DST_METHODS, f"--dst must be one of {DST_METHODS}, got {cfg.dst!r}")
    need(cfg.update_interval >= 1, f"--update-interval must be >= 1 optimizer step, got {cfg.update_interval}")
    need(math.isfinite(cfg.drop_rate) and 0 <= cfg.drop_rate <= 1, f"--drop-rate must be in [0, 1], got {cfg.drop_rate}")
    need(cfg.drop_schedule in DROP_SCHEDULES,
         f"--drop-schedule must be one of {DROP_SCHEDULES}, got {cfg.drop_schedule!r}")
    need(math.isfinite(cfg.update_until) and 0 <= cfg.update_until <= 1,
         f"--update-until must be in [0, 1], got {cfg.update_until}")
    need(cfg.method in METHODS, f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method == "netaug":
        _validate_netaug(cfg)
        need(cfg.density is None, "--method netaug with --density: sparse masks on the NetAug super-model are not "
             "supported; train one of them at a time")
    if opts is None:
        return
    need(opts.workers >= 0, f"--workers must be >= 0, got {opts.workers}")
    need(opts.threads is None or opts.threads >= 1, f"--threads must be >= 1, got {opts.threads}")
    need(opts.dist_timeout is None or (math.isfinite(opts.dist_timeout) and opts.dist_timeout > 0),
         f"--dist-timeout must be a number of seconds > 0, got {opts.dist_timeout}")
    need(opts.branch_parallel >= 1, f"--branch-parallel must be >= 1, got {opts.branch_parallel}")
    need(not (opts.branch_parallel > 1 and opts.export_branches),
         "--export-branches runs in one process: evaluate with --branch-parallel 1 to export")
    methods = [name for name, on in (("--density", cfg.density is not None), ("--method netaug", cfg.method != "cotrain"),
                                      ("--ema-decay", cfg.ema_decay > 0)) if on]
    need(not (opts.branch_parallel > 1 and methods),
         f"--branch-parallel does not run with {', '.join(methods)} (those methods act on the whole grouped model); "
         "drop one of them")
    need(not (opts.branch_parallel > 1 and opts.export_ensemble),
         "--export-ensemble runs in one process: evaluate with --branch-parallel 1 to export")
    need(not (opts.evaluate and opts.resume is None),
         "--evaluate needs --resume CHECKPOINT (or use python -m groupnet.eval)")


def _validate_netaug(cfg: TrainRecipe) -> None:
    """The network-augmentation options, and whether the model has dynamic-width support."""
    from groupnet.models import arch_spec
    from groupnet.netaug import check_multipliers, check_supported_spec

    try:
        check_multipliers("--netaug-width", cfg.netaug_width)
        check_multipliers("--netaug-expand", cfg.netaug_expand)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not (math.isfinite(cfg.netaug_alpha) and cfg.netaug_alpha >= 0):
        raise ConfigError(f"--netaug-alpha must be a finite number >= 0, got {cfg.netaug_alpha}")
    if not 0 <= cfg.netaug_stop <= 1:
        raise ConfigError(f"--netaug-stop must be a fraction of training in [0, 1], got {cfg.netaug_stop}")
    if cfg.netaug_bn_images < 1:
        raise ConfigError(f"--netaug-bn-images must be >= 1, got {cfg.netaug_bn_images}")
    try:
        spec = arch_spec(cfg.model)
    except ValueError:
        return  # the trainer reports an unknown model
    try:
        check_supported_spec(spec)
    except ValueError as e:
        raise ConfigError(f"--method netaug: {e}") from None
