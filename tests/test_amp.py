"""``--amp bf16|fp16`` in the trainer: a CPU bf16 run trains in autocast, the options and the former boolean
``amp`` (configs and checkpoints written before the modes existed) load as the mode they meant."""

from __future__ import annotations

import json

import pytest
import torch

from groupnet.train import main
from groupnet.training.config import TrainRecipe, load_config_file, make_config, parse_options, saved_recipe
from groupnet.training.errors import ConfigError
from groupnet.training.loop import autocast
from helpers.train_runs import load_ckpt, quick


def test_bf16_run_on_cpu_trains_in_autocast_and_saves_the_mode(tmp_path, monkeypatch):
    seen = []
    import groupnet.training.loop as loop

    original = loop.autocast

    def spy(amp, device):
        seen.append((amp, device.type))
        return original(amp, device)

    monkeypatch.setattr(loop, "autocast", spy)
    out = tmp_path / "run"
    assert main(quick(out, "--amp", "bf16", "--device", "cpu", "--epochs", "1")) == 0
    assert seen and set(seen) == {("bf16", "cpu")}
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["recipe"]["amp"] == "bf16"
    assert json.loads((out / "config.json").read_text())["amp"] == "bf16"
    assert ckpt["scaler"] == {}  # no gradient scaling in bf16: the scaler is disabled
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_loss"] == row["train_loss"] and 0 <= row["test_acc_ensemble"] <= 100  # finite, a real run


def test_autocast_region_follows_mode_and_device():
    cpu = torch.device("cpu")
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(None, cpu):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("argv, expected", [
    (["--amp", "bf16"], "bf16"), (["--amp", "fp16"], "fp16"), (["--amp"], "fp16"), (["--amp", "none"], None),
    (["--no-amp"], None), ([], None),
])
def test_amp_command_line(argv, expected):
    from_file, from_cli = parse_options(argv)
    recipe, _ = make_config(TrainRecipe().to_dict(), from_file, from_cli)
    assert recipe.amp == expected


@pytest.mark.parametrize("old, expected", [(True, "fp16"), (False, None), ("bf16", "bf16"), (None, None)])
def test_former_boolean_amp_loads_from_checkpoints_and_config_files(tmp_path, old, expected):
    saved = {**TrainRecipe().to_dict(), "amp": old}
    recipe, _ = make_config(saved_recipe(saved))
    assert recipe.amp == expected
    if old is not None:
        path = tmp_path / "c.yaml"
        path.write_text(f"amp: {json.dumps(old)}\n")
        assert load_config_file(path)["amp"] == expected
        toml = tmp_path / "c.toml"
        toml.write_text(f"amp = {json.dumps(old)}\n")
        assert load_config_file(toml)["amp"] == expected


def test_bad_amp_values_are_refused_with_the_option_named(tmp_path):
    with pytest.raises(SystemExit):
        parse_options(["--amp", "fp8"])
    path = tmp_path / "c.yaml"
    path.write_text("amp: fp8\n")
    with pytest.raises(ConfigError, match="--amp must be one of"):
        make_config(TrainRecipe().to_dict(), load_config_file(path))
    path.write_text("amp: 3\n")
    with pytest.raises(ConfigError, match="'amp'"):
        load_config_file(path)


def test_fp16_needs_cuda(tmp_path, capsys):
    assert main(quick(tmp_path / "r", "--amp", "fp16", "--device", "cpu")) != 0
    assert "--amp needs a CUDA device for fp16" in capsys.readouterr().err
