"""The trainer's extension seam: training methods (sparse masks, network augmentation, weight averaging) plug in as
:class:`TrainingHook` objects instead of editing the epoch loop.

A hook may replace the forward/loss/backward of a step (at most one hook per run), act after every optimizer step,
add entries to each epoch's metrics row, prepare the model before evaluation, and keep state that the checkpoint
stores under ``"hooks"`` (``{hook.name: hook.state_dict()}``), so a resumed run continues it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from groupnet.cotraining import CoTrainingOutput

if TYPE_CHECKING:
    from groupnet.training.config import TrainRecipe
    from groupnet.training.loop import StepContext

__all__ = ["HookBuilder", "TrainingHook", "build_hooks", "check_single_step"]


class TrainingHook:
    """Base class: every method does nothing. Subclass and override what the training method needs."""

    #: Key of this hook's state in the checkpoint's ``"hooks"`` dict; unique per run.
    name: str = "hook"

    def setup(self, trainer: Any) -> None:
        """Called once the model, optimizer, scheduler and loaders are built, before a checkpoint is restored."""

    def step(self, model: nn.Module, x: Tensor, target: Tensor,
             ctx: StepContext) -> tuple[CoTrainingOutput, Tensor] | None:
        """Forward, loss and backward of one training step; return ``(loss output, logits)``, or None for the
        default step. The trainer zeroes gradients before and runs the optimizer (through the grad scaler) after.
        Backward must go through ``ctx.scaler.scale(loss)`` so that float16 gradient scaling keeps working."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step; ``step`` counts optimizer steps of the whole run from 1."""

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Extra entries for the metrics row of ``epoch`` (0-based), after the epoch's last step."""
        return {}

    def before_evaluate(self) -> None:
        """Called before every evaluation of the model on the test set."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


#: Builds a method's hook from the recipe, or returns None when the recipe does not ask for the method.
HookBuilder = Callable[["TrainRecipe"], "TrainingHook | None"]


def build_hooks(recipe: TrainRecipe, builders: Sequence[HookBuilder]) -> list[TrainingHook]:
    """The hooks the recipe asks for, in the builders' order; names must be unique and one hook at most
    may replace the step."""
    hooks = [h for h in (b(recipe) for b in builders) if h is not None]
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"training hooks must have unique names, got {names}")
    check_single_step(hooks)
    return hooks


def check_single_step(hooks: Sequence[TrainingHook]) -> None:
    """Refuse two hooks that both replace the training step (their order would silently decide the method)."""
    stepping = [h.name for h in hooks if type(h).step is not TrainingHook.step]
    if len(stepping) > 1:
        raise ValueError(f"training methods {stepping} both replace the training step; use one of them")
