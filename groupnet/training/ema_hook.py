"""Exponential moving average of the weights (``torch.optim.swa_utils``), as a training hook.

With ``--ema-decay d`` the hook keeps ``AveragedModel(model, get_ema_multi_avg_fn(d), use_buffers=True)``, updated
after every optimizer step (batch-norm running statistics are averaged too, so the average needs no extra pass
over the data), evaluates it on the test set at the end of every epoch (``ema_test_acc_*`` and ``ema_test_ce_*``
in the metrics row) and stores it in the checkpoint under ``hooks["ema"]``, so a resumed run continues the average.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from groupnet.training.hooks import TrainingHook
from groupnet.training.loop import evaluate

if TYPE_CHECKING:
    from groupnet.training.config import TrainRecipe


class EMAHook(TrainingHook):
    """Keeps and evaluates the exponential moving average of the model's weights (see the module docstring)."""

    name = "ema"

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.trainer: Any = None
        self.average: AveragedModel | None = None

    def setup(self, trainer: Any) -> None:
        self.trainer = trainer
        self.average = AveragedModel(trainer.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    def after_optimizer_step(self, step: int) -> None:
        assert self.average is not None
        self.average.update_parameters(self.trainer.model)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        t = self.trainer
        assert self.average is not None
        row = evaluate(self.average.module, t.test_loader, device=t.device, branches=t.recipe.branches,
                       num_classes=t.data.num_classes, ensemble_mode=t.recipe.ensemble,
                       channels_last=t.recipe.channels_last, amp=t.recipe.amp)
        return {f"ema_{key}": value for key, value in row.items() if key.startswith("test_")}

    def state_dict(self) -> dict[str, Any]:
        assert self.average is not None
        return {"decay": self.decay, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.average is not None
        self.average.load_state_dict(state["average"])


def ema_hook(recipe: TrainRecipe) -> EMAHook | None:
    """The EMA hook when the recipe asks for one (``ema_decay > 0``)."""
    return EMAHook(recipe.ema_decay) if getattr(recipe, "ema_decay", 0.0) > 0 else None
