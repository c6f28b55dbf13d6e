"""The co-training run: build data, model and optimiser from a TrainRecipe, train, evaluate, checkpoint, resume,
export, and compare with the K=1 baseline; :func:`evaluate_checkpoint` for a trained checkpoint.

Order of work, so that a failing run writes nothing: options, checkpoint (when resuming), model name and data set
are all checked before the output folder is touched. The folder is then created (a new name when another run took
the default one) and locked for the whole run (:mod:`groupnet.training.run_folder`); a fresh run refuses a folder
that already holds checkpoints unless ``--overwrite``. Files are written only after a completed epoch whose
parameters, buffers and losses are all finite, each through an atomic replace, in this order: ``best.pt`` (when
the epoch is the best so far), ``last.pt`` (which records the epoch ``best.pt`` holds), then ``config.json`` and
the metric files, rewritten from what ``last.pt`` holds. A run that fails before its first save removes the
folders it created. README "What a run guarantees" says what each crash point leaves.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shlex
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from groupnet.cotraining import CoTrainingLoss, CoTrainingWeightRamp
from groupnet.cpu_memory import retain_freed_memory
from groupnet.data import DataBundle, eval_loader, load_dataset, recipe_augment, train_loader
from groupnet.models import arch_spec, build_model, split_weight_decay
from groupnet.models import divide as divide_spec
from groupnet.models.imported import is_import_path, load_class
from groupnet.ops import prefers_channels_last
from groupnet.training import checkpoint as ckpt_io
from groupnet.training.config import MODEL_IDENTITY, RunOptions, TrainRecipe, coerce, make_config
from groupnet.training.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    context_from_env,
    convert_sync_batchnorm,
    init_process_group,
)
from groupnet.training.errors import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged, UserError
from groupnet.training.export import export_branches, export_ensemble
from groupnet.training.hooks import build_hooks
from groupnet.training.loop import StepContext, evaluate, train_one_epoch
from groupnet.training.metrics import PLOT, MetricsLog, plot_curves
from groupnet.training.run_folder import RunFolder, atomic_write_text, clean_temp_files, dumps
from groupnet.training.optim import build_optimizer
from groupnet.training.accuracy_table import accuracy_table
from groupnet.training.branch_parallel import BranchParallel, BranchParallelModel, BranchParallelStep, check_layout
from groupnet.training.hooks import check_single_step
from groupnet.training.lr_schedule import WarmupCosineLR
from groupnet.training.methods import METHOD_HOOKS

SUMMARY = "summary.json"
CONFIG = "config.json"
BASELINE_DIR = "baseline-k1"


def _log(msg: str, ctx: DistContext) -> None:
    if ctx.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into ``run_dir/tensorboard`` (imported here: tensorboard is optional)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def resolve_device(name: str, ctx: DistContext) -> torch.device:
    """``auto``: this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", ctx.local_rank)
    elif dev.type != "cpu":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


def config_for_run(from_file: dict[str, Any], from_cli: dict[str, Any]
                   ) -> tuple[TrainRecipe, RunOptions, dict[str, Any] | None]:
    """The run's recipe and options and, when resuming, the loaded checkpoint (whose recipe is the base)."""
    resume = from_cli.get("resume", from_file.get("resume"))
    if resume is None:
        return (*make_config(TrainRecipe().to_dict(), from_file, from_cli), None)
    evaluating = from_cli.get("evaluate", from_file.get("evaluate", False))
    ckpt = ckpt_io.load(resume, training_state=not evaluating)
    path = ckpt_io.resolve(resume)
    recipe, opts = make_config(ckpt["recipe"], {"resume": str(path), "output_dir": str(path.parent)},
                               from_file, from_cli)
    _check_same_model(recipe, ckpt, path)
    return recipe, opts, ckpt


def _check_same_model(recipe: TrainRecipe, ckpt: dict[str, Any], path: Path) -> None:
    saved = ckpt["recipe"]
    changed = [f"{f}={getattr(recipe, f)!r} (checkpoint: {saved.get(f)!r})" for f in MODEL_IDENTITY
               if getattr(recipe, f) != saved.get(f)]
    if changed:
        raise CheckpointError(f"checkpoint {path} holds another model than this run asks for: {', '.join(changed)}; "
                              "drop those options to continue it, or start a new run without --resume")


def evaluate_checkpoint(checkpoint: str | Path, options: RunOptions | None = None,
                        **recipe_changes: Any) -> dict[str, Any]:
    """Per-branch and ensemble test accuracy of a trained checkpoint (a file or a run folder); prints the table.

    The checkpoint's recipe describes the model and the data set. ``recipe_changes`` may change how the test set is
    read and combined (``data_dir``, ``eval_batch_size``, ``ensemble``, ...), never the model. ``options`` say how
    this invocation runs (device, workers, ``export_branches`` into the run folder, ...); their ``resume`` and
    ``evaluate`` are set here, and ``output_dir`` defaults to the checkpoint's folder.

    Returns the summary: accuracies, parameter count, run folder, and the paths of exported branches.
    """
    not_recipe = sorted(set(recipe_changes) - set(TrainRecipe().to_dict()))
    if not_recipe:
        raise ConfigError(f"evaluate_checkpoint: {not_recipe} are not recipe options (pass them in RunOptions)")
    changes = {k: coerce(k, v, "evaluate_checkpoint") for k, v in recipe_changes.items()}
    ckpt = ckpt_io.load(checkpoint)
    path = ckpt_io.resolve(checkpoint)
    opts = options or RunOptions()
    run_options = {**vars(opts), "resume": str(checkpoint), "evaluate": True,
                   "output_dir": opts.output_dir if opts.output_dir is not None else str(path.parent)}
    run_options = {k: coerce(k, v, "RunOptions") for k, v in run_options.items()}
    recipe, opts = make_config(ckpt["recipe"], changes, run_options)
    _check_same_model(recipe, ckpt, path)
    return run(recipe, opts, ckpt)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Trainer:
    """One run of a :class:`TrainRecipe` (a K-branch model, or the K=1 baseline) in this process, as
    :class:`RunOptions` say."""

    def __init__(self, recipe: TrainRecipe, options: RunOptions | None = None, ckpt: dict[str, Any] | None = None,
                 ctx: DistContext | None = None) -> None:
        self.recipe, self.opts, self.ctx = recipe, options or RunOptions(), ctx or context_from_env()
        cfg, opts, ctx = self.recipe, self.opts, self.ctx
        if cfg.batch_size % ctx.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the "
                              f"{ctx.world_size} processes")
        if opts.branch_parallel > 1:
            try:
                check_layout(cfg.branches, opts.branch_parallel, ctx.world_size)
            except ValueError as e:
                raise ConfigError(f"--branch-parallel {opts.branch_parallel}: {e} (start the processes with torchrun "
                                  "--nproc_per_node P)") from None
        self.device = resolve_device(opts.device, ctx)
        if self.device.type == "cpu":
            retain_freed_memory()  # large activations are otherwise page-faulted in at every step (cpu_memory.py)
        if opts.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)")
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("--amp needs a CUDA device for fp16 (float16 autocast with gradient scaling); "
                              "on the CPU use --amp bf16")
        try:
            spec = None if is_import_path(cfg.model) else arch_spec(cfg.model)
            if spec is None:
                load_class(cfg.model)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
        if spec is not None:
            try:
                divide_spec(spec, cfg.branches, "splitnet")
            except ValueError as e:  # the library's hint names build_model's divide_rule, which the CLI does not have
                reason = str(e).split("; use rule=")[0]
                fits = [k for k in range(1, cfg.branches + 9) if _divides(spec, k)][:8]
                raise ConfigError(f"--model {cfg.model} cannot be divided into --branches {cfg.branches}: {reason}"
                                  + (f"; K values that work: {', '.join(map(str, fits))}" if fits else "")) from None
        self.data: DataBundle = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                                             train_subset=cfg.train_subset)
        if cfg.batch_size > len(self.data.train):
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is larger than the {len(self.data.train)} training images")
        size = self.data.image_size
        for name, value in (("padding", cfg.padding), ("cutout", cfg.cutout)):
            if value is not None and value >= size:
                raise ConfigError(f"--{name} {value} is not smaller than the {size}x{size} images of {cfg.dataset}: "
                                  "the model would train on blank images")
        self.run_dir = Path(opts.output_dir) if opts.output_dir else None
        self.ckpt = ckpt
        self.folder: RunFolder | None = None
        #: The epoch the run folder's last.pt holds as far as this run knows (None: no last.pt there).
        self.saved_epoch: int | None = None
        self._saved_here = False  # this invocation wrote a checkpoint
        if ckpt is not None:
            meta = ckpt["model_meta"]
            if (meta.get("num_classes"), meta.get("in_channels")) != (self.data.num_classes, self.data.in_channels):
                raise CheckpointError(
                    f"checkpoint {opts.resume} was trained on {meta.get('num_classes')} classes x "
                    f"{meta.get('in_channels')} channels; data set {cfg.dataset} has {self.data.num_classes} x "
                    f"{self.data.in_channels}")
        if not opts.evaluate:
            self._check_folder_is_free()
            if self._resumes_in_place() and self._resume_path().name != ckpt_io.LAST \
                    and (self.run_dir / ckpt_io.LAST).exists():
                print(f"groupnet.train: warning: resuming from {self._resume_path()} (epoch {ckpt['epoch']}): "
                      f"{self.run_dir / ckpt_io.LAST} will be replaced by this run's checkpoints after its first "
                      "epoch", file=sys.stderr)

    def _resume_path(self) -> Path:
        assert self.opts.resume is not None
        return ckpt_io.resolve(self.opts.resume)

    def _resumes_in_place(self) -> bool:
        """Resuming from a checkpoint in the run folder itself (the usual ``--resume RUN``)."""
        return (self.ckpt is not None and self.run_dir is not None
                and self._resume_path().parent.resolve() == self.run_dir.resolve())

    def _resumes_from_last(self) -> bool:
        """Resuming from the run folder's own ``last.pt``."""
        return self._resumes_in_place() and self._resume_path().name == ckpt_io.LAST

    def _check_folder_is_free(self) -> None:
        """A run may write into a folder holding another run's checkpoints only with ``--overwrite``."""
        if self.run_dir is None or self.opts.overwrite or self._resumes_in_place():
            return
        existing = [n for n in (ckpt_io.LAST, ckpt_io.BEST) if (self.run_dir / n).exists()]
        if existing:
            raise ConfigError(f"{self.run_dir} already holds {', '.join(existing)} from another run: pass "
                              f"--resume {self.run_dir} to continue it, --overwrite to replace it, or another "
                              "--output-dir")

    # ----------------------------------------------------------------------------------------------- building
    def _build(self) -> None:
        cfg, opts, ctx, data = self.recipe, self.opts, self.ctx, self.data
        init_process_group(ctx, self.device, opts.dist_timeout)
        if cfg.channels_last is None:  # the default, resolved before the recipe is saved: channels_last where the
            cfg.channels_last = prefers_channels_last(self.device)  # Triton convs would gather NCHW (CUDA)
        if not opts.evaluate:
            self._open_run_folder()
        elif self.run_dir is None:
            self.run_dir = Path(opts.output_dir or ".")
        seed_everything(cfg.seed)
        model = build_model(cfg.model, branches=cfg.branches, num_classes=data.num_classes,
                            in_channels=data.in_channels, image_size=data.image_size).to(self.device)
        model.execution_order = cfg.execution_order
        self.hooks = build_hooks(cfg, METHOD_HOOKS)
        for hook in self.hooks:
            model = hook.prepare_model(model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.ckpt is not None:
            try:
                model.load_state_dict(self.ckpt["model"])
            except RuntimeError as e:
                first = str(e).strip().splitlines()
                raise CheckpointError(f"checkpoint {opts.resume} does not fit model {cfg.model} with K={cfg.branches}: "
                                      f"{' '.join(first[:2])}") from None
        self.params = count_params(model)
        self.bp: BranchParallel | None = None  # --branch-parallel B > 1: this rank holds K/B of the branches
        if opts.branch_parallel > 1:
            self.bp = BranchParallel(cfg.branches, opts.branch_parallel, self.device.type)
            model = BranchParallelModel(self.bp.shard(model, sync_batchnorm=cfg.sync_bn), self.bp)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
        elif ctx.enabled and cfg.sync_bn:
            convert_sync_batchnorm(model)
        self.model = model
        self.ddp = model
        if ctx.enabled and self.bp is None:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        wd = split_weight_decay(cfg.weight_decay, cfg.branches) if cfg.split_weight_decay else cfg.weight_decay
        self.weight_decay = wd
        self.optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=wd)
        augment = recipe_augment(cfg.recipe, cfg.dataset, padding=data.padding if cfg.padding is None else cfg.padding,
                                 flip=data.flip if cfg.flip is None else cfg.flip, cutout=cfg.cutout)
        pin = self.device.type == "cuda"
        # branch parallelism: the B ranks of a data shard load the same samples
        data_rank, data_size = ((self.bp.layout.data_rank, self.bp.layout.data_size) if self.bp is not None
                                else (ctx.rank, ctx.world_size))
        self.train_loader, self.sampler = train_loader(
            data, views=cfg.branches, augment=augment, global_batch=cfg.batch_size, seed=cfg.seed,
            workers=opts.workers, rank=data_rank, world_size=data_size, pin_memory=pin)
        self.test_loader = eval_loader(data, batch_size=cfg.eval_batch_size, workers=min(opts.workers, 1),
                                       rank=data_rank, world_size=data_size, pin_memory=pin)
        steps = self.sampler.steps_per_epoch()
        self.scheduler = WarmupCosineLR(
            self.optimizer, lr=cfg.lr, total_steps=cfg.epochs * steps, warmup_steps=round(cfg.warmup_epochs * steps),
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, schedule=cfg.lr_schedule)
        self.loss_fn = CoTrainingLoss(cfg.branches, weight=cfg.cot_weight, divergence=cfg.divergence,
                                      check_finite=False, check_targets=False, label_smoothing=cfg.label_smoothing)
        self.ramp = CoTrainingWeightRamp(self.loss_fn, final=cfg.cot_weight, start=min(0.005, cfg.cot_weight),
                                         warmup_epochs=cfg.cot_warmup_epochs)
        # float16 needs gradient scaling (its range underflows small gradients); bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step_ctx = StepContext(self.loss_fn, self.optimizer, self.scheduler, self.scaler, self.device,
                                    cfg.branches, data.num_classes, cfg.ensemble, cfg.channels_last, cfg.amp,
                                    cfg.mixup_alpha, cfg.seed, data_rank, cutmix_alpha=cfg.cutmix_alpha)
        self.step_ctx.hooks = self.hooks
        if self.bp is not None:  # the branch-parallel step keeps no state, so it is not among the saved hooks
            self.step_ctx.hooks = [*self.hooks, BranchParallelStep(self.bp)]
            check_single_step(self.step_ctx.hooks)
            self.step_ctx.replicas = self.bp.layout.branch_groups
        for hook in self.hooks:
            hook.setup(self)
        self.start_epoch, self.best_acc, self.best_epoch, history = 0, -1.0, 0, []
        if self.ckpt is not None:
            if opts.evaluate:  # evaluation needs the weights only
                self.start_epoch = int(self.ckpt["epoch"])
            else:
                self._restore(self.ckpt)
            history = list(self.ckpt.get("history", []))
        self.history = history
        if self.ckpt is not None and not opts.evaluate and self._resumes_in_place():
            self._reconcile_best()

    def _open_run_folder(self) -> None:
        """Create and lock the run folder on the main process (the others learn its name); remove temporary files
        a killed save left there."""
        cfg, ctx = self.recipe, self.ctx
        error: UserError | None = None
        name = str(self.run_dir) if self.run_dir is not None else None
        if ctx.is_main:
            try:
                if self.run_dir is None:
                    stamp = time.strftime("%Y%m%d-%H%M%S")
                    self.folder = RunFolder.open(f"runs/{cfg.dataset}-{cfg.model}-k{cfg.branches}-{stamp}",
                                                 unique=True)
                else:
                    self.folder = RunFolder.open(self.run_dir)
                self.run_dir = self.folder.path
                try:
                    self._check_folder_is_free()  # again, now that no other run can write here
                except UserError:
                    self.folder.release(remove=True)
                    raise
                for p in clean_temp_files(self.run_dir):
                    _log(f"removed {p.name}, left by a save that was killed", ctx)
                name = str(self.run_dir)
            except UserError as e:
                error = e
        if ctx.enabled:
            holder = [name, None if error is None else str(error)]
            torch.distributed.broadcast_object_list(holder, src=0)
            name = holder[0]
            if error is None and holder[1] is not None:
                raise ConfigError(holder[1])
        if error is not None:
            raise error
        assert name is not None
        self.run_dir = Path(name)
        if self._resumes_in_place() and (self.run_dir / ckpt_io.LAST).is_file():
            self.saved_epoch = int(ckpt_io.peek(self.run_dir / ckpt_io.LAST).get("epoch", 0))

    def _reconcile_best(self) -> None:
        """Make ``best.pt`` and the best accuracy of this run agree with the record of ``last.pt``.

        ``best.pt`` is written before ``last.pt``: a crash between the two leaves a ``best.pt`` one epoch ahead,
        which this run adopts (it redoes that epoch, and replaces ``best.pt`` only with a better one). A ``best.pt``
        that misses the recorded best (removed, or left stale by an older groupnet) is rewritten when ``last.pt``
        holds the best state, else it is reported.
        """
        assert self.ckpt is not None and self.run_dir is not None
        best_path = self.run_dir / ckpt_io.BEST
        best = ckpt_io.peek(best_path) if best_path.is_file() else {}
        best_epoch, best_acc = best.get("epoch"), best.get("best_acc")
        if isinstance(best_epoch, int) and best_epoch == self.best_epoch:
            return
        if isinstance(best_epoch, int) and best_epoch > self.start_epoch and isinstance(best_acc, (int, float)):
            self.best_epoch, self.best_acc = best_epoch, float(best_acc)
            return
        if self.best_epoch == self.start_epoch and self.best_epoch > 0:
            if self.ctx.is_main:
                ckpt_io.atomic_save(self.ckpt, best_path)
            _log(f"rewrote {best_path}: {self.run_dir / ckpt_io.LAST} holds the best epoch ({self.best_epoch}), "
                 f"{best_path.name} held {'nothing readable' if best_epoch is None else f'epoch {best_epoch}'}",
                 self.ctx)
        elif self.best_epoch > 0:
            print(f"groupnet.train: warning: {best_path} does not hold the best epoch ({self.best_epoch}) that "
                  f"{self.run_dir / ckpt_io.LAST} records, and that state is not on disk any more; the next epoch "
                  f"better than {self.best_acc:.2f}% replaces it", file=sys.stderr)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            if self.bp is not None:
                self.bp.load_full_optimizer_state(self.optimizer, self.model.module, ckpt["optimizer"])
            else:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
            self.ramp.load_state_dict(ckpt["cot_ramp"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.sampler.load_state_dict(ckpt["sampler"])
            saved_hooks = ckpt.get("hooks", {})
            for hook in self.hooks:
                if hook.name not in saved_hooks:
                    raise KeyError(f"no state for training method {hook.name!r}")
                hook.load_state_dict(saved_hooks[hook.name])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.opts.resume}: cannot restore the training state ({e})") from None
        self.start_epoch, self.best_acc = int(ckpt["epoch"]), float(ckpt.get("best_acc", -1.0))
        self.best_epoch = int(ckpt["best_epoch"]) if "best_epoch" in ckpt else _best_epoch(self.ckpt_history())
        self.step_ctx.global_step = self.start_epoch * self.sampler.steps_per_epoch()
        # Last, after every module and loader is built (building draws from the RNGs).
        ckpt_io.set_rng_state(ckpt["rng"])

    def model_meta(self) -> dict[str, Any]:
        d, cfg = self.data, self.recipe
        return {"arch": cfg.model, "branches": cfg.branches, "dataset": cfg.dataset, "num_classes": d.num_classes,
                "in_channels": d.in_channels, "image_size": d.image_size, "classes": d.classes,
                "mean": list(d.mean), "std": list(d.std), "params": self.params}

    def _checkpoint(self, epoch: int) -> dict[str, Any]:
        model_state, optimizer_state = (self._full_state if self.bp is not None  # see _gather_full_state
                                        else (self.model.state_dict(), self.optimizer.state_dict()))
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "recipe": self.recipe.to_dict(),
            "model_meta": self.model_meta(), "model": model_state,
            "optimizer": optimizer_state, "lr_scheduler": self.scheduler.state_dict(),
            "cot_ramp": self.ramp.state_dict(), "scaler": self.scaler.state_dict(),
            "sampler": {"seed": self.sampler.seed, "epoch": epoch}, "epoch": epoch, "best_acc": self.best_acc,
            "best_epoch": self.best_epoch, "history": self.history, "rng": ckpt_io.rng_state(),
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
        }

    def ckpt_history(self) -> list[dict[str, Any]]:
        return list(self.ckpt.get("history", [])) if self.ckpt is not None else []

    def _gather_full_state(self) -> None:
        """Branch parallelism: every rank joins the gathers of the full model's and optimizer's state that the
        checkpoint holds (so a checkpoint loads in any layout)."""
        if self.bp is not None:
            local = self.model.module
            self._full_state = (self.bp.full_state_dict(local), self.bp.full_optimizer_state(self.optimizer, local))

    # ----------------------------------------------------------------------------------------------- running
    def evaluate(self) -> dict[str, float]:
        for hook in self.hooks:
            hook.before_evaluate()
        return evaluate(self.model, self.test_loader, device=self.device, branches=self.recipe.branches,
                        num_classes=self.data.num_classes, ensemble_mode=self.recipe.ensemble,
                        channels_last=self.recipe.channels_last, amp=self.recipe.amp,
                        replicas=1 if self.bp is None else self.bp.layout.branch_groups)

    def fit(self) -> dict[str, Any]:
        """Train from the start (or the checkpoint) to the recipe's epochs; returns the run summary.

        The run folder stays locked until :meth:`close` (which :func:`run` calls after the baseline); a failure
        closes it here, removing the folders this run created if it saved nothing.
        """
        try:
            return self._fit()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unlock the run folder; when this invocation saved no checkpoint, remove the folders it created."""
        if self.folder is not None:
            self.folder.release(remove=not self._saved_here)

    def _fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        self._build()
        cfg, opts, ctx = self.recipe, self.opts, self.ctx
        assert self.run_dir is not None
        if opts.evaluate:
            return self._finish(self.evaluate(), trained=False)
        self.log = MetricsLog(self.run_dir, self.history)
        if ctx.is_main and self._resumes_from_last():
            self._write_records(self.ckpt_recipe(), self.history)  # describe what last.pt holds, whatever was there
        board = None  # the TensorBoard writer, opened with the first save (nothing is written before it)
        _log(f"run folder {self.run_dir} | {cfg.model} K={cfg.branches} ({self.params:,} params) on {cfg.dataset}, "
             f"{len(self.data.train)} train / {len(self.data.test)} test images, device {self.device}, seed {cfg.seed}"
             + (f", {ctx.world_size} processes" if ctx.enabled else "")
             + (f", resuming after epoch {self.start_epoch}" if self.start_epoch else ""), ctx)
        last_eval: dict[str, float] | None = None
        for epoch in range(self.start_epoch, cfg.epochs):
            self.sampler.set_epoch(epoch)
            lr_start, weight = self.scheduler.current_lr(), self.loss_fn.weight
            bar = tqdm(total=self.sampler.steps_per_epoch(), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=True if not ctx.is_main else None if opts.progress is None else not opts.progress,
                       file=sys.stderr, dynamic_ncols=True)  # None: tqdm shows the bar on a terminal only
            with bar:
                train_row = train_one_epoch(self.ddp, self.train_loader, self.step_ctx, epoch, bar)
            for hook in self.hooks:
                train_row.update(hook.epoch_end(epoch))
            last_eval = self.evaluate()
            self.ramp.step()
            row = {"epoch": epoch + 1, "lr": lr_start, "cot_weight": weight, **train_row, **last_eval}
            self._check_finite(epoch + 1, row)
            self.history.append(row)
            improved = last_eval["test_acc_ensemble"] > self.best_acc
            if improved:
                self.best_acc, self.best_epoch = last_eval["test_acc_ensemble"], epoch + 1
            self._gather_full_state()
            if ctx.is_main:
                self._save(epoch + 1, improved)
                if opts.tensorboard:
                    board = board or _tensorboard_writer(self.run_dir)
                    for key, value in row.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            board.add_scalar(key, value, row["epoch"])
                    board.flush()
            self._saved_here, self.saved_epoch = True, epoch + 1
            barrier()
            if cfg.branches > 1:
                branches = " ".join(f"{last_eval[f'test_acc_{i}']:.2f}" for i in range(cfg.branches))
                losses = f"loss {row['train_loss']:.4f} div {row['train_divergence']:.4f} (w {weight:.3f})"
                accs = f"test acc branches {branches} ensemble {last_eval['test_acc_ensemble']:.2f}"
            else:
                losses, accs = f"loss {row['train_loss']:.4f}", f"test acc {last_eval['test_acc_ensemble']:.2f}"
            _log(f"epoch {epoch + 1:>3}/{cfg.epochs} | {losses} | {accs} | {row['train_images_per_s']:.0f} img/s", ctx)
        if last_eval is None:  # resumed a finished run
            last_eval = self.evaluate()
        if board is not None:
            board.close()
        if ctx.is_main:
            plot_curves(self.history, self.run_dir / PLOT, curves_title(cfg))
        return self._finish(last_eval, trained=True)

    def ckpt_recipe(self) -> dict[str, Any]:
        """The full recipe the resumed checkpoint was trained with."""
        assert self.ckpt is not None
        return {**TrainRecipe().to_dict(), **self.ckpt["recipe"]}

    def _check_finite(self, epoch: int, row: dict[str, Any]) -> None:
        """Raise TrainingDiverged, before anything is saved, when a parameter, a buffer or a loss of the epoch is
        NaN or infinite (decided together by all processes)."""
        named = chain((("parameter", n, t) for n, t in self.model.named_parameters()),
                      (("buffer", n, t) for n, t in self.model.named_buffers()))
        bad = next((f"{kind} {name!r}" for kind, name, t in named
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is None:
            losses = [k for k in row if k.startswith(("train_loss", "train_divergence", "train_ce_", "test_ce_"))]
            bad = next((f"{k} ({row[k]})" for k in losses if not math.isfinite(row[k])), None)
        flag = torch.tensor([0.0 if bad is None else 1.0], dtype=torch.float64, device=self.device)
        if all_reduce_sum(flag).item() == 0:
            return
        where = bad if bad is not None else "a value on another process"
        if self.saved_epoch is not None:
            kept = f"{self.run_dir / ckpt_io.LAST} still holds epoch {self.saved_epoch}"
        else:
            kept = "no checkpoint was written"
        raise TrainingDiverged(f"training diverged in epoch {epoch}: {where} is not finite; nothing of this epoch "
                               f"was saved ({kept}); try a lower --lr")

    def _save(self, epoch: int, improved: bool) -> None:
        """Write the epoch's checkpoints, then the records that describe them (see the module docstring)."""
        assert self.run_dir is not None
        state = self._checkpoint(epoch)
        last, best = self.run_dir / ckpt_io.LAST, self.run_dir / ckpt_io.BEST
        if not self._saved_here and not self._resumes_in_place():
            # The folder's files are not this run's (none, or an overwritten run's): drop them first.
            for name in (ckpt_io.BEST, SUMMARY, PLOT):
                (self.run_dir / name).unlink(missing_ok=True)
        if not self._saved_here and not self._resumes_from_last():
            # The folder's last.pt is not this run's yet: write it first, so that a crash in between leaves a
            # last.pt that records the best epoch, which resume turns into best.pt when it is last.pt's own.
            ckpt_io.atomic_save(state, last)
            if improved:
                ckpt_io.atomic_save(state, best)
        else:
            if improved:  # before last.pt: a crash in between leaves best.pt one epoch ahead, which resume adopts
                ckpt_io.atomic_save(state, best)
            ckpt_io.atomic_save(state, last)
        self._write_records(self.recipe.to_dict(), self.history)

    def _write_records(self, recipe: dict[str, Any], history: list[dict[str, Any]]) -> None:
        assert self.run_dir is not None
        atomic_write_text(self.run_dir / CONFIG, dumps(recipe, indent=2) + "\n")
        self.log.write(history)

    def _finish(self, result: dict[str, float], trained: bool) -> dict[str, Any]:
        cfg = self.recipe
        summary = {
            "model": cfg.model, "branches": cfg.branches, "dataset": cfg.dataset, "ensemble": cfg.ensemble,
            "epochs": int(self.ckpt["epoch"]) if (self.ckpt is not None and not trained) else cfg.epochs,
            "params": self.params, "test_images": result["test_images"],
            "test_acc": [result[f"test_acc_{i}"] for i in range(cfg.branches)],
            "test_acc_ensemble": result["test_acc_ensemble"], "run_dir": str(self.run_dir),
        }
        for hook in self.hooks:
            summary.update(hook.summary())
        if self.opts.export_branches and self.ctx.is_main:
            assert self.run_dir is not None
            paths = export_branches(self.model, self.run_dir / "export", self.model_meta())
            summary["exported"] = [str(p) for p in paths]
            _log(f"exported {len(paths)} branches to {self.run_dir / 'export'}", self.ctx)
        if self.opts.export_ensemble and self.ctx.is_main:
            assert self.run_dir is not None
            path = export_ensemble(self.model, self.run_dir / "export", self.model_meta(), self.recipe.ensemble)
            summary["exported_ensemble"] = str(path)
            _log(f"exported the ensemble to {path}", self.ctx)
        if trained and self.ctx.is_main:
            assert self.run_dir is not None
            atomic_write_text(self.run_dir / SUMMARY, dumps(summary, indent=2) + "\n")
        barrier()
        return summary


def _divides(spec: Any, k: int) -> bool:
    try:
        divide_spec(spec, k, "splitnet")
    except ValueError:
        return False
    return True


def curves_title(cfg: TrainRecipe) -> str:
    return f"{cfg.model} K={cfg.branches} on {cfg.dataset}"


def _best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch the trainer kept as best (the first with the highest ensemble accuracy), 0 for none."""
    best, epoch = -1.0, 0
    for row in history:
        acc = row.get("test_acc_ensemble")
        if isinstance(acc, (int, float)) and acc > best:
            best, epoch = float(acc), int(row.get("epoch", 0))
    return epoch


def baseline_command(cfg: TrainRecipe) -> str:
    args = ["python", "-m", "groupnet.train", "--model", cfg.model, "--branches", "1", "--dataset", cfg.dataset,
            "--epochs", str(cfg.epochs)]
    if cfg.data_dir:
        args += ["--data-dir", cfg.data_dir]
    return shlex.join(args)


def run(cfg: TrainRecipe, options: RunOptions | None = None, ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or evaluate) the recipe as the options say, then the K=1 baseline when asked; prints the final table.

    Returns the run summary (accuracies, parameter count, run folder, and the baseline's summary when trained).
    """
    opts = options or RunOptions()
    ctx = context_from_env()
    start = time.perf_counter()
    threads = opts.threads if opts.threads is not None else (1 if cfg.dataset == "digits" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(cfg, opts, ckpt, ctx, start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: TrainRecipe, opts: RunOptions, ckpt: dict[str, Any] | None, ctx: DistContext,
         start: float) -> dict[str, Any]:
    trainer = Trainer(cfg, opts, ckpt, ctx)
    try:
        return _train(trainer, cfg, opts, ctx, start)
    except KeyboardInterrupt:
        if opts.evaluate:
            raise
        raise RunInterrupted(trainer.run_dir, trainer.saved_epoch) from None
    finally:
        trainer.close()


def _train(trainer: Trainer, cfg: TrainRecipe, opts: RunOptions, ctx: DistContext, start: float) -> dict[str, Any]:
    summary = trainer.fit()
    want_baseline = cfg.baseline if cfg.baseline is not None else cfg.dataset == "digits"
    baseline = None
    if want_baseline and cfg.branches > 1 and not opts.evaluate:
        assert trainer.run_dir is not None
        base_dir = trainer.run_dir / BASELINE_DIR
        base_ckpt = None
        if opts.resume is not None and (base_dir / ckpt_io.LAST).exists():
            base_ckpt = ckpt_io.load(base_dir, training_state=True)
        _log(f"training the K=1 baseline in {base_dir}", ctx)
        base_cfg = cfg.replace(branches=1, baseline=False)
        base_opts = opts.replace(output_dir=str(base_dir), export_branches=False, export_ensemble=False,
                                 overwrite=True, branch_parallel=1,
                                 resume=str(base_dir / ckpt_io.LAST) if base_ckpt is not None else None)
        base_trainer = Trainer(base_cfg, base_opts, base_ckpt, ctx)
        try:
            baseline = base_trainer.fit()
        finally:
            base_trainer.close()
        summary["baseline"] = baseline
        if ctx.is_main:
            atomic_write_text(trainer.run_dir / SUMMARY, dumps(summary, indent=2) + "\n")
            plot_curves(trainer.history, trainer.run_dir / PLOT, curves_title(cfg), baseline=base_trainer.history)
    if opts.evaluate:
        assert trainer.run_dir is not None
        stored = trainer.run_dir / BASELINE_DIR / SUMMARY  # the baseline trained beside this run, if any
        baseline = json.loads(stored.read_text()) if stored.is_file() else None
    hint = baseline_command(cfg) if cfg.branches > 1 and baseline is None and not opts.evaluate else None
    table = accuracy_table(summary, baseline, hint)
    summary["wall_seconds"] = time.perf_counter() - start
    where = (f"evaluated {opts.resume}" if opts.evaluate
             else f"metrics, curves and checkpoints in {summary['run_dir']}")
    _log("\n" + table + f"\nwall time {summary['wall_seconds']:.1f} s; {where}", ctx)
    return summary
