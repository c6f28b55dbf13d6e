"""``--method netaug``: network augmentation (NetAug, Cai et al., ICLR 2022) of every branch, as a training hook.

The trainer builds the tiny model (each branch the divided network); :meth:`NetAugHook.prepare_model` replaces it
by the augmented super-model (:func:`groupnet.netaug.make_dynamic`), whose minimum configuration is the tiny model.
Each step, on one batch:

1. the tiny model: forward, the co-training loss of the K branches (``default_step``), backward; under DDP inside
   ``no_sync()``, so the step still all-reduces once;
2. one augmented model, its configuration drawn from a generator seeded by ``--seed`` (identical on every rank):
   forward, ``alpha * sum_k CE_k``, backward;
3. one optimizer step (the trainer's) on the summed gradients.

Width augmentation stops after ``--netaug-stop`` of the epochs (NetAug's code stops it for the second half);
expansion augmentation goes on. A family without expansion choices then has no augmented model left and the step
is the tiny model's alone. While widths are augmented, the inner channels of every block are sorted by L1
importance at the start of each epoch (:meth:`groupnet.netaug.WidthSpace.sort_channels`). Before every evaluation
the tiny model's batch-norm statistics are re-estimated on a fixed subset of the training images (seeded), and the
model is left in its minimum configuration, so evaluation, ``--export-branches`` and the checkpoint's
``extract_branch`` all see the tiny model. The generator's state is in the checkpoint: a resumed run draws the same
configurations.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from groupnet.cotraining import CoTrainingOutput
from groupnet.data.loaders import SingleViewDataset
from groupnet.netaug import WidthSpace, make_dynamic, recalibrate_batchnorm
from groupnet.training.distributed import all_reduce_sum
from groupnet.training.errors import ConfigError
from groupnet.training.hooks import TrainingHook
from groupnet.training.loop import StepContext, autocast, default_step

__all__ = ["NetAugHook", "build_netaug_hook", "augmented_loss"]


def augmented_loss(logits: Tensor, target: Tensor, branches: int) -> Tensor:
    """``sum_k CE_k`` of the augmented model's logits ``(N, K*C)``, each branch's mean over the batch; ``target`` is
    class indices ``(N,)`` or soft targets ``(N, C)`` (mixup)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    z = logits.unflatten(1, (branches, -1)).transpose(0, 1).flatten(0, 1)  # (K*N, C)
    t = target.repeat(branches) if target.dim() == 1 else target.repeat(branches, 1)
    return F.cross_entropy(z, t) * branches


class NetAugHook(TrainingHook):
    """The NetAug training step, channel sorting, precise BN and the sampler's state (see the module docstring)."""

    name = "netaug"

    def __init__(self, width_mults: tuple[float, ...], expand_mults: tuple[float, ...], *, alpha: float = 1.0,
                 stop: float = 0.5, sort: bool = True, bn_images: int = 2000, seed: int = 0,
                 sync_bn: bool = False) -> None:
        self.width_mults, self.expand_mults = tuple(width_mults), tuple(expand_mults)
        self.alpha, self.stop, self.sort, self.bn_images, self.seed = alpha, stop, sort, bn_images, seed
        self.sync_bn = sync_bn
        self.generator = torch.Generator().manual_seed(seed)
        self.space: WidthSpace | None = None
        self.trainer: Any = None
        self._sums = torch.zeros(4, dtype=torch.float64)  # images, tiny loss, augmented loss, augmented steps

    # ------------------------------------------------------------------------------------------------ building
    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.sync_bn and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ConfigError("--method netaug keeps per-process batch-norm statistics (its batch norms are "
                              "dynamic-width): pass --no-sync-bn when training on several processes")
        try:
            big, self.space = make_dynamic(model, self.width_mults, self.expand_mults)
        except ValueError as e:
            raise ConfigError(f"--method netaug: {e}") from None
        return big

    def setup(self, trainer: Any) -> None:
        if self.space is None:
            raise RuntimeError("NetAugHook.setup before prepare_model: the trainer did not let the hook build the model")
        self.trainer = trainer
        self.steps_per_epoch = trainer.sampler.steps_per_epoch()
        self.epochs = trainer.recipe.epochs
        self.width_epochs = self.stop * self.epochs
        tiny, largest = self.complexities(trainer.data.in_channels, trainer.data.image_size)
        trainer.params = tiny["params"]  # the model a run keeps is the tiny one
        if trainer.ctx.is_main:
            print(f"netaug: tiny model {tiny['params']:,.0f} params {tiny['flops'] / 1e6:.2f} MMACs per image (all "
                  f"branches); largest augmented model {largest['params']:,.0f} params "
                  f"{largest['flops'] / 1e6:.2f} MMACs; {len(self.space.choices)} width choices", file=sys.stdout)

    def complexities(self, in_channels: int, image_size: int) -> tuple[dict[str, float], dict[str, float]]:
        """``groupnet.complexity`` of the tiny and of the largest augmented model (all K branches)."""
        from groupnet.complexity import complexity

        space = self.space
        assert space is not None
        saved = dict(space.config)
        out = []
        try:
            for config in (space.min_config(), space.max_config()):
                space.set(config)
                out.append(complexity(space.freeze(), (in_channels, image_size, image_size)).as_dict())
        finally:
            space.set(saved)
        return out[0], out[1]

    # ------------------------------------------------------------------------------------------------ training
    def widths_augmented(self, step: int) -> bool:
        """Width augmentation is on for the first ``stop`` fraction of the epochs (``step`` counts from 0)."""
        return step // self.steps_per_epoch < self.width_epochs

    def step(self, model: nn.Module, x: Tensor, target: Tensor,
             ctx: StepContext) -> tuple[CoTrainingOutput, Tensor]:
        space = self.space
        assert space is not None
        widths = self.widths_augmented(ctx.global_step)
        if self.sort and widths and ctx.global_step % self.steps_per_epoch == 0:
            space.sort_channels(ctx.optimizer)
        space.set_min()
        no_sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        augment = any(c.kind == "expand" or widths for c in space.choices) and self.alpha > 0
        with no_sync if augment else contextlib.nullcontext():
            out, logits = default_step(model, x, target, ctx)
        n = x.shape[0]
        self._sums += torch.tensor([n, float(out.loss.detach()) * n, 0.0, 0.0], dtype=torch.float64)
        if augment:
            config = space.sample(self.generator, widths=widths)
            space.set(config)
            try:
                with autocast(ctx.amp, ctx.device):
                    aug_logits = model(x)
                aug = augmented_loss(aug_logits, target, ctx.branches)
                ctx.scaler.scale(self.alpha * aug).backward()
            finally:
                space.set_min()
            self._sums += torch.tensor([0.0, 0.0, float(aug.detach()) * n, 1.0], dtype=torch.float64)
        return out, logits

    def epoch_end(self, epoch: int) -> dict[str, float]:
        device = self.trainer.device if self.trainer is not None else torch.device("cpu")
        total = all_reduce_sum(self._sums.to(device)).cpu().tolist()
        self._sums.zero_()
        n = max(total[0], 1.0)
        row = {"netaug_tiny_loss": total[1] / n,
               "netaug_aug_loss": total[2] / n if total[3] else float("nan"),
               "netaug_width_augmented": float(epoch < self.width_epochs)}
        if self.trainer is not None and self.trainer.ctx.is_main:
            print(f"netaug epoch {epoch + 1}: tiny loss {row['netaug_tiny_loss']:.4f}, augmented loss "
                  f"{row['netaug_aug_loss']:.4f}, width augmentation {'on' if row['netaug_width_augmented'] else 'off'}",
                  file=sys.stdout)
        return row

    # ------------------------------------------------------------------------------------------------ evaluation
    def bn_batches(self):
        """The fixed, seeded subset of training images (one view, normalised) that re-estimates BN statistics."""
        trainer = self.trainer
        data = trainer.data
        ds = SingleViewDataset(data.train, data.mean, data.std)
        n = min(self.bn_images, len(ds))
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))[:n].tolist()
        loader = DataLoader(Subset(ds, order), batch_size=min(256, n), shuffle=False, num_workers=0)
        cl = trainer.recipe.channels_last
        for x, _ in loader:
            x = x.to(trainer.device)
            yield x.contiguous(memory_format=torch.channels_last) if cl else x

    def before_evaluate(self) -> None:
        assert self.space is not None
        self.space.set_min()
        if self.trainer is not None:
            recalibrate_batchnorm(self.trainer.model, self.bn_batches())

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "width_mults": list(self.width_mults),
                "expand_mults": list(self.expand_mults)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def build_netaug_hook(recipe) -> NetAugHook | None:
    """The NetAug hook when the recipe asks for ``method="netaug"``."""
    if getattr(recipe, "method", "cotrain") != "netaug":
        return None
    return NetAugHook(recipe.netaug_width, recipe.netaug_expand, alpha=recipe.netaug_alpha, stop=recipe.netaug_stop,
                      sort=recipe.netaug_sort, bn_images=recipe.netaug_bn_images, seed=recipe.seed,
                      sync_bn=recipe.sync_bn)
