"""The training recipe is saved and restored; run options are never saved; older flat checkpoints and the former
``schedule`` name still work; ``python -m groupnet.eval`` goes through :func:`groupnet.training.evaluate_checkpoint`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from groupnet import training
from groupnet.eval import main as eval_main
from groupnet.train import main
from groupnet.training import trainer as trainer_module
from groupnet.training.config import RunOptions, TrainRecipe, make_config, parse_options
from groupnet.training.errors import CheckpointError, ConfigError
from groupnet.training.trainer import config_for_run
from helpers.train_runs import assert_tensors_equal, load_ckpt, quick

RECIPE_FIELDS = {f.name for f in dataclasses.fields(TrainRecipe)}
RUN_FIELDS = {f.name for f in dataclasses.fields(RunOptions)}
# recipe values other than the defaults, and run options other than quick()'s, to see which ones a resume keeps
RECIPE_CHANGES = ["--lr", "0.07", "--cutout", "2", "--execution-order", "branch", "--seed", "3"]


def test_recipe_and_run_options_are_disjoint_and_cover_every_option():
    assert not RECIPE_FIELDS & RUN_FIELDS
    parser_options = {a.dest for a in training.build_parser()._actions if a.dest not in ("help", "config")}
    assert parser_options == RECIPE_FIELDS | RUN_FIELDS


def test_run_options_are_absent_from_the_checkpoint_and_config_json(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", "--threads", "1", *RECIPE_CHANGES)) == 0
    for name in ("last.pt", "best.pt"):
        ckpt = load_ckpt(out / name)
        assert "config" not in ckpt and set(ckpt["recipe"]) == RECIPE_FIELDS, name
    saved = json.loads((out / "config.json").read_text())
    assert set(saved) == RECIPE_FIELDS
    assert (saved["lr"], saved["cutout"], saved["execution_order"], saved["seed"]) == (0.07, 2, "branch", 3)
    assert saved == load_ckpt(out / "last.pt")["recipe"]


def test_resume_with_other_run_options_keeps_the_recipe(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", *RECIPE_CHANGES)) == 0
    before = load_ckpt(out / "last.pt")["recipe"]

    recipe, options, _ = config_for_run({}, {"resume": str(out), "workers": 1, "threads": 1, "device": "cpu",
                                              "progress": False})
    assert recipe == TrainRecipe(**before)
    assert options == RunOptions(device="cpu", workers=1, threads=1, output_dir=str(out), resume=str(out),
                                 progress=False)
    # nothing of the first invocation's run options comes back: they start from their defaults
    _, options, _ = config_for_run({}, {"resume": str(out)})
    assert options == RunOptions(output_dir=str(out), resume=str(out))

    # a real resume with other run options, extending the run by one epoch
    assert main(["--resume", str(out), "--epochs", "2", "--workers", "1", "--threads", "2", "--no-progress"]) == 0
    after = load_ckpt(out / "last.pt")
    assert after["epoch"] == 2 and after["recipe"] == {**before, "epochs": 2}


def _as_flat_version_1(ckpt: dict, run_dir) -> dict:
    """A checkpoint as groupnet wrote it before the recipe was split from the run options."""
    old = dict(ckpt)
    recipe = dict(old.pop("recipe"))
    recipe["schedule"] = recipe.pop("execution_order")
    old["config"] = {**recipe, "device": "cpu", "workers": 0, "threads": None, "output_dir": str(run_dir),
                     "resume": None, "overwrite": False, "evaluate": False, "export_branches": False,
                     "progress": False}
    old["version"] = 1
    return old


def test_an_old_flat_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # grouped: building the branch-major plan draws from the global RNG once, at the first branch-major forward
    recipe_changes = ["--lr", "0.07", "--cutout", "2", "--execution-order", "grouped", "--seed", "3"]
    assert main(quick(straight, *recipe_changes)) == 0

    # stop the second run before its second epoch, then rewrite its checkpoint in the old flat form
    real_epoch, calls = trainer_module.train_one_epoch, {"n": 0}

    def stop_before_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_one_epoch", stop_before_epoch_2)
    assert main(quick(split, *recipe_changes)) == 130
    monkeypatch.setattr(trainer_module, "train_one_epoch", real_epoch)
    ckpt = load_ckpt(split / "last.pt")
    assert ckpt["epoch"] == 1
    torch.save(_as_flat_version_1(ckpt, split), split / "last.pt")

    recipe, options, loaded = config_for_run({}, {"resume": str(split)})
    assert recipe == TrainRecipe(**ckpt["recipe"]) and recipe.execution_order == "grouped"
    assert options == RunOptions(output_dir=str(split), resume=str(split))
    assert "config" not in loaded and loaded["version"] == 2

    assert main(["--resume", str(split), "--no-progress"]) == 0
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert b["epoch"] == 2 and b["recipe"] == a["recipe"] and "config" not in b
    for key in ("model", "optimizer", "lr_scheduler", "cot_ramp", "sampler", "rng", "best_acc"):
        assert_tensors_equal(a[key], b[key], key)


def test_a_checkpoint_of_an_unknown_version_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    ckpt = load_ckpt(out / "last.pt")
    ckpt["version"] = 99
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(CheckpointError, match="version 99, this groupnet reads versions 1, 2"):
        config_for_run({}, {"resume": str(out)})


def test_eval_cli_goes_through_evaluate_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    summary = json.loads((out / "summary.json").read_text())

    direct = training.evaluate_checkpoint(out / "last.pt", RunOptions(workers=0, progress=False), ensemble="probs")
    assert direct["test_acc"] == summary["test_acc"] and direct["run_dir"] == str(out)
    assert "K=2 ensemble (probs)" in capsys.readouterr().out

    calls = []
    real = training.evaluate_checkpoint

    def spy(checkpoint, options=None, **changes):
        calls.append((checkpoint, options, changes))
        return real(checkpoint, options, **changes)

    monkeypatch.setattr(training, "evaluate_checkpoint", spy)
    assert eval_main([str(out), "--batch-size", "50", "--device", "cpu", "--data-dir", str(tmp_path)]) == 0
    assert calls == [(str(out), RunOptions(device="cpu", workers=0, progress=False), {"eval_batch_size": 50,
                                                                                      "data_dir": str(tmp_path)})]
    printed = capsys.readouterr().out
    assert all(f"{acc:.2f}" in printed for acc in summary["test_acc"])


def test_evaluate_checkpoint_refuses_run_options_and_another_model(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    with pytest.raises(ConfigError, match=r"\['workers'\] are not recipe options"):
        training.evaluate_checkpoint(out, workers=0)
    with pytest.raises(CheckpointError, match="holds another model"):
        training.evaluate_checkpoint(out, RunOptions(workers=0), branches=3)


def test_the_former_schedule_option_sets_the_execution_order(tmp_path, capsys):
    _, from_cli = parse_options(["--schedule", "branch"])
    assert from_cli == {"execution_order": "branch"}
    assert "--schedule is deprecated, use --execution-order" in capsys.readouterr().err
    assert "--schedule" not in training.build_parser().format_help()  # hidden from --help

    config = tmp_path / "old.yaml"
    config.write_text("schedule: grouped\n")
    from_file, from_cli = parse_options(["--config", str(config)])
    assert from_file == {"execution_order": "grouped"}
    assert "'schedule' in config file" in capsys.readouterr().err
    recipe, _ = make_config(TrainRecipe().to_dict(), from_file, from_cli)
    assert recipe.execution_order == "grouped"
    # in a file the new name wins over the former one; on the command line the last one given, as for any option
    config.write_text("schedule: grouped\nexecution-order: branch\n")
    assert parse_options(["--config", str(config)])[0] == {"execution_order": "branch"}
    assert parse_options(["--execution-order", "grouped", "--schedule", "branch"])[1] == {"execution_order": "branch"}

    with pytest.raises(ConfigError, match="--execution-order must be one of"):
        make_config(TrainRecipe().to_dict(), {"execution_order": "sideways"})

    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", "--schedule", "branch")) == 0
    assert load_ckpt(out / "last.pt")["recipe"]["execution_order"] == "branch"


def test_the_channels_last_default_is_resolved_before_the_recipe_is_saved(tmp_path):
    """Unset, channels_last follows the device (on where the grouped convs run Triton on CUDA); the saved recipe
    holds the resolved value, so a resumed run keeps the layout it started with."""
    assert TrainRecipe().channels_last is None
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", "--threads", "1")) == 0
    assert json.loads((out / "config.json").read_text())["channels_last"] is False  # CPU
    assert load_ckpt(out / "last.pt")["recipe"]["channels_last"] is False
