"""The trainer's hook seam: a hook sees every optimizer step, adds metrics, may replace the step, and its state
resumes exactly; two hooks replacing the step are refused."""

from __future__ import annotations

import json

import pytest
import torch

from groupnet.train import main
from groupnet.training import methods
from groupnet.training.hooks import TrainingHook, build_hooks, check_single_step
from groupnet.training.loop import default_step
from helpers.train_runs import load_ckpt, quick


class CountingHook(TrainingHook):
    """Counts optimizer steps and evaluations, and replaces the step with the default one plus a record."""

    name = "counting"

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.evaluations = 0
        self.stepped = 0

    def step(self, model, x, target, ctx):
        self.stepped += 1
        return default_step(model, x, target, ctx)

    def after_optimizer_step(self, step: int) -> None:
        self.steps.append(step)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        return {"counted_steps": float(len(self.steps))}

    def before_evaluate(self) -> None:
        self.evaluations += 1

    def state_dict(self):
        return {"steps": list(self.steps)}

    def load_state_dict(self, state):
        self.steps = list(state["steps"])


@pytest.fixture
def counting(monkeypatch):
    made: list[CountingHook] = []

    def builder(recipe):
        made.append(CountingHook())
        return made[-1]

    monkeypatch.setattr(methods, "METHOD_HOOKS", [builder])
    monkeypatch.setattr("groupnet.training.trainer.METHOD_HOOKS", [builder])
    return made


def test_a_hook_sees_every_step_and_resumes_with_its_state(tmp_path, counting):
    straight, split = tmp_path / "straight", tmp_path / "split"
    constant = ("--lr-schedule", "constant")  # the schedule then does not depend on --epochs
    assert main(quick(straight, "--epochs", "2", *constant)) == 0
    hook = counting[-1]
    assert hook.steps == list(range(1, 13))  # 192 images / batch 32 = 6 steps per epoch
    assert hook.stepped == 12 and hook.evaluations == 2
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["counted_steps"] for r in rows] == [6.0, 12.0]
    assert load_ckpt(straight / "last.pt")["hooks"] == {"counting": {"steps": list(range(1, 13))}}

    assert main(quick(split, "--epochs", "1", *constant)) == 0
    assert main(["--resume", str(split), "--epochs", "2", "--no-progress", "--workers", "0"]) == 0
    resumed = counting[-1]
    assert resumed.steps == list(range(1, 13))
    a, b = load_ckpt(straight / "last.pt")["model"], load_ckpt(split / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_without_the_hooks_state_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1")) == 0  # no hooks: the checkpoint holds none
    monkeypatch.setattr("groupnet.training.trainer.METHOD_HOOKS", [lambda recipe: CountingHook()])
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress", "--workers", "0"]) == 2
    assert "counting" in capsys.readouterr().err


class OtherStepHook(CountingHook):
    name = "other"


def test_two_hooks_replacing_the_step_are_refused():
    with pytest.raises(ValueError, match="both replace the training step"):
        check_single_step([CountingHook(), OtherStepHook()])
    with pytest.raises(ValueError, match="unique names"):
        build_hooks(None, [lambda r: TrainingHook(), lambda r: TrainingHook()])
    assert [h.name for h in build_hooks(None, [lambda r: None, lambda r: CountingHook()])] == ["counting"]
