"""Checkpoints: exact resume (also after a run killed mid-epoch), atomic writes, and unusable checkpoints."""

from __future__ import annotations

import functools
import json
import os
import random

import numpy as np
import pytest
import torch

from groupnet.cotraining import CoTrainingLoss
from groupnet.eval import main as eval_main
from groupnet.models import build_model
from groupnet.train import main
from groupnet.training import trainer as trainer_module
from groupnet.training import checkpoint as ckpt_io
from helpers.train_runs import assert_tensors_equal, load_ckpt, quick

# mixup and cutout exercise every random stream of a step; 2 workers check the loader side of resuming
RANDOM_EVERYTHING = ["--mixup-alpha", "0.4", "--cutout", "3", "--flip", "--workers", "2"]
STEPS_PER_EPOCH = 192 // 32


def _timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("train_images_per_s", "train_seconds")} for r in rows]


def test_resume_after_a_kill_mid_epoch_equals_a_straight_run(tmp_path, monkeypatch, capsys):
    # classifier dropout makes training draw from the global torch RNG, whose state the checkpoint must restore
    monkeypatch.setattr(trainer_module, "build_model", functools.partial(build_model, drop_rate=0.3))
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(quick(straight, *RANDOM_EVERYTHING)) == 0

    # Kill the second run in the middle of epoch 2 (as Ctrl-C or a scheduler's SIGINT would).
    calls = {"n": 0}
    forward = CoTrainingLoss.forward

    def dying_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEPS_PER_EPOCH + 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CoTrainingLoss, "forward", dying_forward)
    assert main(quick(split, *RANDOM_EVERYTHING)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert load_ckpt(split / "last.pt")["epoch"] == 1  # the kill lost only the current epoch
    monkeypatch.setattr(CoTrainingLoss, "forward", forward)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # the resumed process's RNGs start elsewhere
    assert main(["--resume", str(split), "--no-progress"]) == 0
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert b["epoch"] == 2
    for key in ("model", "optimizer", "lr_scheduler", "cot_ramp", "scaler", "sampler", "rng", "best_acc"):
        assert_tensors_equal(a[key], b[key], key)
    assert _timeless(a["history"]) == _timeless(b["history"])
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert _timeless(rows) == _timeless(a["history"])  # the log holds each epoch once


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    before = (out / "last.pt").read_bytes()
    assert main(["--resume", str(out / "last.pt"), "--no-progress"]) == 0
    assert (out / "last.pt").read_bytes() == before


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.atomic_save({"a": torch.ones(3)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_rng_state_round_trip():
    state = ckpt_io.rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


# ------------------------------------------------------------------------------------------- unusable checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pt"}


def _one_line_error(err: str, prog: str = "groupnet.train") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(trained_run, tmp_path, capsys, damage):
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    data = (trained_run / "last.pt").read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        torch.save({"state_dict": {"w": torch.ones(2)}}, bad)
    before = _snapshot(bad.parent)
    assert main(["--resume", str(bad), "--no-progress"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(bad) in line
    assert ("not a groupnet training checkpoint" if damage == "foreign" else "truncated or not a torch") in line
    assert _snapshot(bad.parent) == before
    assert eval_main([str(bad)]) == 2
    _one_line_error(capsys.readouterr().err, "groupnet.eval")


@pytest.mark.parametrize("option", [["--branches", "4"], ["--model", "resnet20"], ["--dataset", "cifar10"]])
def test_checkpoint_of_another_model_is_refused(trained_run, capsys, option):
    before = _snapshot(trained_run)
    assert main(["--resume", str(trained_run), "--no-progress", *option]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "holds another model" in line and option[0].lstrip("-") in line
    assert _snapshot(trained_run) == before


def test_checkpoint_whose_weights_do_not_fit_is_refused(trained_run, tmp_path, capsys):
    ckpt = load_ckpt(trained_run / "last.pt")
    ckpt["recipe"]["branches"] = 3  # claims K=3, holds K=2 weights
    ckpt["model_meta"]["branches"] = 3
    bad = tmp_path / "k3.pt"
    torch.save(ckpt, bad)
    assert eval_main([str(bad)]) == 2
    line = _one_line_error(capsys.readouterr().err, "groupnet.eval")
    assert "does not fit model small_cnn with K=3" in line


def test_fresh_run_does_not_overwrite_an_existing_run(trained_run, capsys):
    before = _snapshot(trained_run)
    assert main(["--output-dir", str(trained_run), "--no-progress", "--epochs", "1"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "already holds" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(trained_run) == before


def _damaged(ckpt, damage):
    ckpt = dict(ckpt)
    if damage == "no rng":
        del ckpt["rng"]
    elif damage == "epoch a string":
        ckpt["epoch"] = "3"
    elif damage == "negative epoch":
        ckpt["epoch"] = -1
    elif damage == "float rng tensor":
        ckpt["rng"] = {**ckpt["rng"], "torch": torch.zeros(8)}
    elif damage == "short numpy key":
        ckpt["rng"] = {**ckpt["rng"], "numpy": {**ckpt["rng"]["numpy"], "key": torch.zeros(3, dtype=torch.int64)}}
    elif damage == "recipe value of the wrong type":
        ckpt["recipe"] = {**ckpt["recipe"], "lr": "fast"}
    elif damage == "model a list":
        ckpt["model"] = [torch.ones(2)]
    elif damage == "model entry not a tensor":
        ckpt["model"] = {**ckpt["model"], "head.weight": 3}
    elif damage == "history a string":
        ckpt["history"] = "epoch 1"
    elif damage == "sampler without seed":
        ckpt["sampler"] = {"epoch": 1}
    elif damage == "optimizer a list":
        ckpt["optimizer"] = []
    elif damage == "num_classes a string":
        ckpt["model_meta"] = {**ckpt["model_meta"], "num_classes": "10"}
    elif damage == "hooks not dicts":
        ckpt["hooks"] = {"sparse": 1}
    return ckpt


# damage: the text the one-line error must hold
DAMAGES = {
    "no rng": "lacks ['rng']",
    "epoch a string": "'epoch' must be an int >= 0",
    "negative epoch": "'epoch' must be an int >= 0",
    "float rng tensor": "rng['torch'] must be a uint8 tensor",
    "short numpy key": "rng['numpy'] must hold an MT19937 state",
    "recipe value of the wrong type": "its recipe is invalid (option 'lr' must be float",
    "model a list": "'model' must be a dict of tensors",
    "model entry not a tensor": "entry 'head.weight' is int",
    "history a string": "'history' must be a list of metric rows",
    "sampler without seed": "'sampler' must be a dict with int 'seed' and 'epoch'",
    "optimizer a list": "'optimizer' must be a dict",
    "num_classes a string": "model_meta['num_classes'] must be an int >= 1",
    "hooks not dicts": "'hooks' must be a dict of hook name -> state dict",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_structurally_wrong_checkpoint_is_refused_naming_the_problem(trained_run, tmp_path, capsys, damage):
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    torch.save(_damaged(load_ckpt(trained_run / "last.pt"), damage), bad)
    before = _snapshot(bad.parent)
    assert main(["--resume", str(bad), "--no-progress"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert str(bad) in line and DAMAGES[damage] in line, line
    assert _snapshot(bad.parent) == before and sorted(p.name for p in bad.parent.iterdir()) == ["last.pt"]


def test_evaluation_needs_no_training_state(trained_run, tmp_path, capsys):
    ckpt = load_ckpt(trained_run / "last.pt")
    for key in ("rng", "optimizer", "sampler"):
        del ckpt[key]
    path = tmp_path / "weights.pt"
    torch.save(ckpt, path)
    assert eval_main([str(path)]) == 0
    capsys.readouterr()
    assert main(["--resume", str(path), "--no-progress"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "it cannot be resumed; it can still be evaluated" in line


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_holding_python_objects_is_refused_without_torch_advice(trained_run, tmp_path, capsys):
    ckpt = load_ckpt(trained_run / "last.pt")
    ckpt["extra"] = _Payload()
    bad = tmp_path / "last.pt"
    torch.save(ckpt, bad)
    assert main(["--resume", str(bad), "--no-progress"]) == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert "this must never run" not in captured.out
    assert f"refused checkpoint {bad}" in line and "print" in line
    assert "weights_only" not in line and "trust" not in line
