"""One training epoch and one evaluation pass: the co-training step, metrics summed over processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from groupnet.cotraining import CoTrainingLoss, CoTrainingOutput
from groupnet.data.augment import cutmix, mixup
from groupnet.ensembling import ensemble, split_branches
from groupnet.training.calibration import ECE_BINS, calibration_sums, expected_calibration_error
from groupnet.training.distributed import all_reduce_sum
from groupnet.training.errors import TrainingDiverged
from groupnet.training.hooks import TrainingHook
from groupnet.training.lr_schedule import WarmupCosineLR


@dataclass
class StepContext:
    """What a training step needs besides the model and the batch."""

    loss_fn: CoTrainingLoss
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineLR
    scaler: torch.amp.GradScaler
    device: torch.device
    branches: int
    num_classes: int
    ensemble_mode: str = "logits"
    channels_last: bool = False
    amp: str | None = None  # None, "bf16" or "fp16" (torch.autocast on the device)
    mixup_alpha: float = 0.0
    seed: int = 0
    rank: int = 0
    hooks: list[TrainingHook] = field(default_factory=list)
    #: Optimizer steps taken in this run so far (restored on resume).
    global_step: int = 0
    cutmix_alpha: float = 0.0
    #: Processes that train on the same samples (the B ranks of a branch-parallel data shard): the metric sums
    #: over all processes count each sample this many times.
    replicas: int = 1


def _to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str | None, device: torch.device):
    """The ``--amp`` region of a forward pass: ``torch.autocast`` on ``device`` in bf16/fp16, or nothing."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def default_step(model: nn.Module, x: Tensor, target: Tensor, ctx: StepContext) -> tuple[CoTrainingOutput, Tensor]:
    """Forward all branches, the co-training loss, backward (through the grad scaler)."""
    with autocast(ctx.amp, ctx.device):
        logits = model(x)
    out = ctx.loss_fn(logits.float(), target)
    ctx.scaler.scale(out.loss).backward()
    return out, logits


def _forward_backward(model: nn.Module, x: Tensor, target: Tensor,
                      ctx: StepContext) -> tuple[CoTrainingOutput, Tensor]:
    for hook in ctx.hooks:
        result = hook.step(model, x, target, ctx)
        if result is not None:
            return result
    return default_step(model, x, target, ctx)


def train_one_epoch(model: nn.Module, loader: Iterable, ctx: StepContext, epoch: int,
                    progress=None) -> dict[str, float]:
    """Train one epoch; returns the epoch's mean loss terms, per-branch and ensemble accuracy and throughput.

    Accuracy on the training views: branch k is scored on its own view; with mixup, against the label of the
    larger mixing share. Mixup and cutmix draw one lambda and permutation (and cutmix its box) per step from a
    generator seeded by (seed, epoch, step, rank).
    """
    model.train()
    k, c = ctx.branches, ctx.num_classes
    sums = torch.zeros(3 + 2 * k + 1, dtype=torch.float64, device=ctx.device)  # n, loss, div, ce_k, correct_k, ens
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = _to_device(x, ctx.device, ctx.channels_last), y.to(ctx.device, non_blocking=True)
        target, scored = y, y
        if ctx.mixup_alpha > 0 or ctx.cutmix_alpha > 0:
            rng = np.random.default_rng([ctx.seed, epoch, step, ctx.rank])
            # with both on, a fair coin picks one per step (drawn only then: mixup-only runs keep their stream)
            use_cutmix = ctx.cutmix_alpha > 0 and (ctx.mixup_alpha == 0 or rng.random() < 0.5)
            x, target = (cutmix(x, y, c, ctx.cutmix_alpha, rng) if use_cutmix
                         else mixup(x, y, c, ctx.mixup_alpha, rng))
            scored = target.argmax(1)
        ctx.optimizer.zero_grad(set_to_none=True)
        out, logits = _forward_backward(model, x, target, ctx)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        ctx.global_step += 1
        for hook in ctx.hooks:
            hook.after_optimizer_step(ctx.global_step)
        ctx.scheduler.step()
        with torch.no_grad():
            n = y.shape[0]
            per_branch = split_branches(logits.detach().float(), k).argmax(-1)  # (K, N)
            ens = ensemble(logits.detach().float(), k, ctx.ensemble_mode).argmax(-1)
            sums += torch.cat([
                torch.tensor([n], device=ctx.device, dtype=torch.float64),
                (out.loss.detach() * n).double().view(1), (out.divergence * n).double().view(1),
                (out.ce * n).double(), (per_branch == scored).sum(1).double(), (ens == scored).sum().double().view(1),
            ])
        if progress is not None:
            progress.update(1)
            if step % 10 == 0:
                loss_now = float(out.loss.detach())
                if not np.isfinite(loss_now):
                    raise TrainingDiverged(f"the training loss became {loss_now} in epoch {epoch + 1}, step {step}; "
                                           "try a lower --lr")
                progress.set_postfix(loss=f"{loss_now:.3f}", lr=f"{ctx.scheduler.current_lr():.4f}")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    total = (all_reduce_sum(sums) / ctx.replicas).cpu().tolist()
    n = max(total[0], 1.0)
    if not np.isfinite(total[1]):
        raise TrainingDiverged(f"the training loss became {total[1] / n} in epoch {epoch + 1}; try a lower --lr")
    row = {"train_loss": total[1] / n, "train_divergence": total[2] / n}
    row.update({f"train_ce_{i}": total[3 + i] / n for i in range(k)})
    row.update({f"train_acc_{i}": 100 * total[3 + k + i] / n for i in range(k)})
    row["train_acc_ensemble"] = 100 * total[3 + 2 * k] / n
    row["train_images_per_s"] = total[0] / seconds if seconds > 0 else float("nan")
    row["train_seconds"] = seconds
    return row


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, branches: int, num_classes: int,
             ensemble_mode: str = "logits", channels_last: bool = False, amp: str | None = None,
             replicas: int = 1) -> dict[str, float]:
    """Per-branch and ensemble test accuracy (%) and cross-entropy, and the ensemble's expected calibration error
    (%, :mod:`groupnet.training.calibration`), feeding one view to all branches. ``replicas``: processes that
    evaluate the same samples (the B ranks of a branch-parallel data shard); the sums are divided by it."""
    model.eval()
    k = branches
    sums = torch.zeros(1 + 2 * k + 2, dtype=torch.float64, device=device)  # n, correct_k, ce_k, ens correct, ens ce
    calibration = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = _to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(x)
        logits = logits.float()
        per_branch = split_branches(logits, k)  # (K, N, C)
        ce = torch.stack([nn.functional.cross_entropy(per_branch[i], y, reduction="sum") for i in range(k)])
        scores = ensemble(logits, k, ensemble_mode)
        sums += torch.cat([
            torch.tensor([y.shape[0]], device=device, dtype=torch.float64),
            (per_branch.argmax(-1) == y).sum(1).double(), ce.double(),
            (scores.argmax(-1) == y).sum().double().view(1),
            nn.functional.cross_entropy(scores, y, reduction="sum").double().view(1),
        ])
        calibration += calibration_sums(scores, y)
    # one collective for both: the sums, then the calibration bins
    reduced = (all_reduce_sum(torch.cat([sums, calibration.flatten()])) / replicas).cpu()
    total = reduced[:sums.numel()].tolist()
    n = max(total[0], 1.0)
    row = {f"test_acc_{i}": 100 * total[1 + i] / n for i in range(k)}
    row.update({f"test_ce_{i}": total[1 + k + i] / n for i in range(k)})
    row["test_acc_ensemble"] = 100 * total[1 + 2 * k] / n
    row["test_ce_ensemble"] = total[2 + 2 * k] / n
    row["test_ece_ensemble"] = 100 * expected_calibration_error(reduced[sums.numel():].view(3, ECE_BINS))
    row["test_images"] = int(total[0])
    return row
