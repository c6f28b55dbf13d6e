"""The co-training run: build data, model and optimiser from a TrainRecipe, train, evaluate, checkpoint, resume,
export, and compare with the K=1 baseline; :func:`evaluate_checkpoint` for a trained checkpoint.

Order of work, so that a failing run writes nothing: options, checkpoint (when resuming), model name and data set
are all checked before the output folder is touched; checkpoints are written only after a completed epoch, with
an atomic replace. A fresh run refuses a folder that already holds checkpoints unless ``--overwrite``.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from groupnet.cotraining import CoTrainingLoss, CoTrainingWeightRamp
from groupnet.cpu_memory import retain_freed_memory
from groupnet.data import Augment, DataBundle, eval_loader, load_dataset, train_loader
from groupnet.models import arch_spec, build_model, split_weight_decay
from groupnet.training import checkpoint as ckpt_io
from groupnet.training.config import MODEL_IDENTITY, RunOptions, TrainRecipe, coerce, make_config
from groupnet.training.distributed import (
    DistContext,
    barrier,
    context_from_env,
    convert_sync_batchnorm,
    init_process_group,
)
from groupnet.training.errors import CheckpointError, ConfigError
from groupnet.training.export import export_branches
from groupnet.training.hooks import build_hooks
from groupnet.training.loop import StepContext, evaluate, train_one_epoch
from groupnet.training.metrics import PLOT, MetricsLog, plot_curves
from groupnet.training.optim import build_sgd
from groupnet.training.accuracy_table import accuracy_table
from groupnet.training.branch_parallel import BranchParallel, BranchParallelModel, BranchParallelStep, check_layout
from groupnet.training.hooks import check_single_step
from groupnet.training.lr_schedule import WarmupCosineLR
from groupnet.training.methods import METHOD_HOOKS

SUMMARY = "summary.json"
BASELINE_DIR = "baseline-k1"


def _log(msg: str, ctx: DistContext) -> None:
    if ctx.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


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
    ckpt = ckpt_io.load(resume)
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
        if cfg.amp and self.device.type != "cuda":
            raise ConfigError("--amp needs a CUDA device (it is float16 autocast with gradient scaling)")
        try:
            arch_spec(cfg.model)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
        self.data: DataBundle = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                                             train_subset=cfg.train_subset)
        if cfg.batch_size > len(self.data.train):
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is larger than the {len(self.data.train)} training images")
        self.run_dir = Path(opts.output_dir) if opts.output_dir else None
        self.ckpt = ckpt
        if ckpt is not None:
            meta = ckpt["model_meta"]
            if (meta.get("num_classes"), meta.get("in_channels")) != (self.data.num_classes, self.data.in_channels):
                raise CheckpointError(
                    f"checkpoint {opts.resume} was trained on {meta.get('num_classes')} classes x "
                    f"{meta.get('in_channels')} channels; data set {cfg.dataset} has {self.data.num_classes} x "
                    f"{self.data.in_channels}")
        if not opts.evaluate and ckpt is None and self.run_dir is not None and not opts.overwrite:
            existing = [n for n in (ckpt_io.LAST, ckpt_io.BEST) if (self.run_dir / n).exists()]
            if existing:
                raise ConfigError(f"{self.run_dir} already holds {', '.join(existing)} from another run: pass "
                                  f"--resume {self.run_dir} to continue it, --overwrite to replace it, or another "
                                  "--output-dir")

    # ----------------------------------------------------------------------------------------------- building
    def _build(self) -> None:
        cfg, opts, ctx, data = self.recipe, self.opts, self.ctx, self.data
        init_process_group(ctx, self.device)
        if self.run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"runs/{cfg.dataset}-{cfg.model}-k{cfg.branches}-{stamp}"
            if ctx.enabled:
                holder = [name]
                torch.distributed.broadcast_object_list(holder, src=0)
                name = holder[0]
            self.run_dir = Path(name)
        seed_everything(cfg.seed)
        model = build_model(cfg.model, branches=cfg.branches, num_classes=data.num_classes,
                            in_channels=data.in_channels).to(self.device)
        model.execution_order = cfg.execution_order
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
        self.optimizer = build_sgd(model, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
        augment = Augment(padding=data.padding if cfg.padding is None else cfg.padding,
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
                                      check_finite=False, check_targets=False)
        self.ramp = CoTrainingWeightRamp(self.loss_fn, final=cfg.cot_weight, start=min(0.005, cfg.cot_weight),
                                         warmup_epochs=cfg.cot_warmup_epochs)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp)
        self.step_ctx = StepContext(self.loss_fn, self.optimizer, self.scheduler, self.scaler, self.device,
                                    cfg.branches, data.num_classes, cfg.ensemble, cfg.channels_last, cfg.amp,
                                    cfg.mixup_alpha, cfg.seed, data_rank)
        self.hooks = build_hooks(cfg, METHOD_HOOKS)
        self.step_ctx.hooks = self.hooks
        if self.bp is not None:  # the branch-parallel step keeps no state, so it is not among the saved hooks
            self.step_ctx.hooks = [*self.hooks, BranchParallelStep(self.bp)]
            check_single_step(self.step_ctx.hooks)
            self.step_ctx.replicas = self.bp.layout.branch_groups
        for hook in self.hooks:
            hook.setup(self)
        self.start_epoch, self.best_acc, history = 0, -1.0, []
        if self.ckpt is not None:
            self._restore(self.ckpt)
            history = list(self.ckpt.get("history", []))
        self.history = history

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
            "history": self.history, "rng": ckpt_io.rng_state(),
            "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
        }

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
        """Train from the start (or the checkpoint) to the recipe's epochs; returns the run summary."""
        from tqdm import tqdm

        self._build()
        cfg, opts, ctx = self.recipe, self.opts, self.ctx
        assert self.run_dir is not None
        if opts.evaluate:
            return self._finish(self.evaluate(), trained=False)
        log = MetricsLog(self.run_dir, self.history) if ctx.is_main else None
        if ctx.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _log(f"run folder {self.run_dir} | {cfg.model} K={cfg.branches} ({self.params:,} params) on {cfg.dataset}, "
             f"{len(self.data.train)} train / {len(self.data.test)} test images, device {self.device}"
             + (f", {ctx.world_size} processes" if ctx.enabled else "")
             + (f", resuming after epoch {self.start_epoch}" if self.start_epoch else ""), ctx)
        last_eval: dict[str, float] | None = None
        for epoch in range(self.start_epoch, cfg.epochs):
            self.sampler.set_epoch(epoch)
            lr_start, weight = self.scheduler.current_lr(), self.loss_fn.weight
            bar = tqdm(total=self.sampler.steps_per_epoch(), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not (opts.progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
            with bar:
                train_row = train_one_epoch(self.ddp, self.train_loader, self.step_ctx, epoch, bar)
            for hook in self.hooks:
                train_row.update(hook.epoch_end(epoch))
            last_eval = self.evaluate()
            self.ramp.step()
            row = {"epoch": epoch + 1, "lr": lr_start, "cot_weight": weight, **train_row, **last_eval}
            self.history.append(row)
            improved = last_eval["test_acc_ensemble"] > self.best_acc
            if improved:
                self.best_acc = last_eval["test_acc_ensemble"]
            self._gather_full_state()
            if ctx.is_main:
                state = self._checkpoint(epoch + 1)
                ckpt_io.atomic_save(state, self.run_dir / ckpt_io.LAST)
                if improved:
                    ckpt_io.atomic_save(state, self.run_dir / ckpt_io.BEST)
                assert log is not None
                log.append(row)
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
        if ctx.is_main:
            plot_curves(self.history, self.run_dir / PLOT, f"{cfg.model} K={cfg.branches} on {cfg.dataset}")
        return self._finish(last_eval, trained=True)

    def _finish(self, result: dict[str, float], trained: bool) -> dict[str, Any]:
        cfg = self.recipe
        summary = {
            "model": cfg.model, "branches": cfg.branches, "dataset": cfg.dataset, "ensemble": cfg.ensemble,
            "epochs": int(self.ckpt["epoch"]) if (self.ckpt is not None and not trained) else cfg.epochs,
            "params": self.params, "test_images": result["test_images"],
            "test_acc": [result[f"test_acc_{i}"] for i in range(cfg.branches)],
            "test_acc_ensemble": result["test_acc_ensemble"], "run_dir": str(self.run_dir),
        }
        if self.opts.export_branches and self.ctx.is_main:
            assert self.run_dir is not None
            paths = export_branches(self.model, self.run_dir / "export", self.model_meta())
            summary["exported"] = [str(p) for p in paths]
            _log(f"exported {len(paths)} branches to {self.run_dir / 'export'}", self.ctx)
        if trained and self.ctx.is_main:
            assert self.run_dir is not None
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary


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
    summary = trainer.fit()
    want_baseline = cfg.baseline if cfg.baseline is not None else cfg.dataset == "digits"
    baseline = None
    if want_baseline and cfg.branches > 1 and not opts.evaluate:
        assert trainer.run_dir is not None
        base_dir = trainer.run_dir / BASELINE_DIR
        base_ckpt = None
        if opts.resume is not None and (base_dir / ckpt_io.LAST).exists():
            base_ckpt = ckpt_io.load(base_dir)
        _log(f"training the K=1 baseline in {base_dir}", ctx)
        base_cfg = cfg.replace(branches=1, baseline=False)
        base_opts = opts.replace(output_dir=str(base_dir), export_branches=False, overwrite=True, branch_parallel=1,
                                 resume=str(base_dir / ckpt_io.LAST) if base_ckpt is not None else None)
        baseline = Trainer(base_cfg, base_opts, base_ckpt, ctx).fit()
        summary["baseline"] = baseline
        if ctx.is_main:
            (trainer.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
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
