"""Sparse training in the trainer (``--density``): per-branch masks, SET / RigL updates, ITOP statistics.

The hook builds a :class:`groupnet.sparse.Masking` over the model (not its DDP wrapper) once the optimizer exists,
masks weights and optimizer state after every optimizer step, prunes and regrows every ``--update-interval`` steps,
adds the density, R_s per branch, the union R_s and the mean pairwise mask overlap to every epoch's metrics, and
keeps masks, fired masks, the generator and the schedule in the checkpoint.

Under DDP every process draws the masks from the same seed and updates them from the same weights and the same
all-reduced gradients, so the masks agree; the hook verifies it after every update and at every epoch's end
(a fingerprint of the masks, all-reduced as min and max) and stops the run if they ever differ.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from groupnet.sparse import DynamicSparseTraining, Masking, itop_stats
from groupnet.training.config import TrainRecipe
from groupnet.training.hooks import TrainingHook

#: Added to the run's seed for the masks' generator (a stream of its own, equal on every process).
MASK_SEED_OFFSET = 7919


class SparseTrainingHook(TrainingHook):
    """Dynamic sparse training of every branch (see the module docstring)."""

    name = "sparse"

    def __init__(self, recipe: TrainRecipe) -> None:
        assert recipe.density is not None
        self.recipe = recipe
        self.method = recipe.dst or "rigl"
        self.masking: Masking | None = None
        self.dst: DynamicSparseTraining | None = None
        self.is_main = True

    def setup(self, trainer: Any) -> None:
        r = self.recipe
        self.is_main = trainer.ctx.is_main
        self.masking = Masking(trainer.model, r.density, init=r.sparse_init, dense_first_last=r.dense_first_last,
                               seed=r.seed + MASK_SEED_OFFSET, optimizer=trainer.optimizer)
        total = r.epochs * trainer.sampler.steps_per_epoch()
        self.dst = DynamicSparseTraining(self.masking, self.method, total_steps=total,
                                         update_interval=r.update_interval, drop_rate=r.drop_rate,
                                         drop_schedule=r.drop_schedule, update_until=r.update_until)
        if trainer.ckpt is None:  # a resumed run's weights are masked already; its masks come with load_state_dict
            self.masking.apply()
        self.check_agreement()

    def after_optimizer_step(self, step: int) -> None:
        assert self.dst is not None
        if self.dst.step(step):
            self.check_agreement()

    def check_agreement(self) -> None:
        """Under DDP, raise RuntimeError unless every process holds the same masks."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        assert self.masking is not None
        fp = self.masking.fingerprint()
        t = torch.tensor([fp, -fp], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError("sparse masks differ between processes (they must be drawn from the same seed and "
                               "updated from the same weights and gradients)")

    def stats_row(self) -> dict[str, float]:
        assert self.masking is not None and self.dst is not None
        row = itop_stats(self.masking).as_row()
        row["sparse_mask_updates"] = float(self.dst.updates)
        return row

    def epoch_end(self, epoch: int) -> dict[str, float]:
        self.check_agreement()
        row = self.stats_row()
        if self.is_main:
            k = sum(1 for key in row if key.startswith("itop_rate_") and key != "itop_rate_union")
            rates = " ".join(f"{row[f'itop_rate_{i}']:.3f}" for i in range(k))
            extra = f" union {row['itop_rate_union']:.3f} overlap {row['mask_overlap']:.3f}" if k > 1 else ""
            print(f"sparse {self.method}: density {row['sparse_density']:.4f} | R_s {rates}{extra} | "
                  f"{int(row['sparse_mask_updates'])} mask updates", file=sys.stderr)
        return row

    def summary(self) -> dict[str, Any]:
        assert self.masking is not None
        stats = itop_stats(self.masking)
        return {"sparse": {"method": self.method, "init": self.recipe.sparse_init,
                           "density": sum(stats.density) / len(stats.density), "itop_rate": stats.itop_rate,
                           "itop_rate_union": stats.itop_rate_union, "mask_overlap": stats.mean_overlap}}

    def state_dict(self) -> dict[str, Any]:
        assert self.masking is not None and self.dst is not None
        return {"masking": self.masking.state_dict(), "schedule": self.dst.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.masking is not None and self.dst is not None
        self.masking.load_state_dict(state["masking"])
        self.dst.load_state_dict(state["schedule"])
        self.masking.apply()
        self.check_agreement()


def sparse_hook(recipe: TrainRecipe) -> SparseTrainingHook | None:
    """The sparse-training hook when the recipe sets ``--density``."""
    return None if recipe is None or recipe.density is None else SparseTrainingHook(recipe)
