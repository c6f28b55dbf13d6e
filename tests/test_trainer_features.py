"""Trainer features users of timm/pycls expect: AdamW, label smoothing, cutmix (with mixup), an EMA of the weights
(torch.optim.swa_utils) that resumes exactly, TensorBoard scalars, the seed in the log, progress bars left to tqdm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from groupnet.data.augment import cutmix
from groupnet.train import main
from groupnet.training.config import TrainRecipe, make_config, parse_options
from groupnet.training.errors import ConfigError
from helpers.train_runs import assert_tensors_equal, load_ckpt, quick


@given(n=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9), alpha=st.floats(0.1, 4.0),
       seed=st.integers(0, 2**31 - 1))
def test_cutmix_pastes_one_box_and_weights_targets_by_the_area_kept(n, h, w, alpha, seed):
    x = torch.randn(n, 4, h, w, dtype=torch.float64)
    y = torch.randint(0, 5, (n,))
    out, target = cutmix(x, y, 5, alpha, np.random.default_rng(seed))
    again, target_again = cutmix(x, y, 5, alpha, np.random.default_rng(seed))
    assert torch.equal(out, again) and torch.equal(target, target_again)  # a function of the generator
    rng = np.random.default_rng(seed)
    rng.beta(alpha, alpha)
    perm = torch.from_numpy(rng.permutation(n))
    pasted = out != x
    box = (out == x[perm]) & ~(x == x[perm])
    assert torch.equal(pasted, box)  # every changed pixel comes from the partner image
    changed = pasted.any(0).any(0)  # (h, w): one box, the same for every image and channel
    if changed.any():
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    torch.testing.assert_close(target.sum(1), torch.ones(n, dtype=torch.float64))
    kept = 1 - changed.double().mean()
    expected = kept * torch.nn.functional.one_hot(y, 5) + (1 - kept) * torch.nn.functional.one_hot(y[perm], 5)
    if n > 1 and changed.any():
        torch.testing.assert_close(target, expected.double())


def test_adamw_smoothing_cutmix_mixup_ema_and_tensorboard_in_one_run(tmp_path, capsys):
    out = tmp_path / "run"
    opts = ["--optimizer", "adamw", "--lr", "0.002", "--label-smoothing", "0.1", "--cutmix-alpha", "1.0",
            "--mixup-alpha", "0.2", "--ema-decay", "0.9", "--tensorboard", "--seed", "5"]
    assert main(quick(out, *opts)) == 0
    stdout = capsys.readouterr().out
    assert "seed 5" in stdout
    ckpt = load_ckpt(out / "last.pt")
    recipe = ckpt["recipe"]
    assert (recipe["optimizer"], recipe["label_smoothing"], recipe["cutmix_alpha"], recipe["ema_decay"]) == (
        "adamw", 0.1, 1.0, 0.9)
    assert "betas" in ckpt["optimizer"]["param_groups"][0]  # AdamW's state, not SGD's
    assert ckpt["hooks"]["ema"]["decay"] == 0.9
    assert int(ckpt["hooks"]["ema"]["average"]["n_averaged"]) == 12  # 2 epochs x 6 steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["ema_test_acc_ensemble"] <= 100 for r in rows)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train_loss", "test_acc_ensemble", "ema_test_acc_ensemble", "lr"} <= set(scalars)
    assert [e.step for e in acc.Scalars("test_acc_ensemble")] == [1, 2]
    assert [e.value for e in acc.Scalars("test_acc_ensemble")] == pytest.approx([r["test_acc_ensemble"] for r in rows])


def test_ema_resumes_exactly(tmp_path, monkeypatch):
    from groupnet.cotraining import CoTrainingLoss

    opts = ["--ema-decay", "0.8", "--cutmix-alpha", "1.0", "--mixup-alpha", "0.4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(quick(straight, *opts)) == 0
    calls = {"n": 0}
    forward = CoTrainingLoss.forward

    def dying_forward(self, *args, **kwargs):  # killed in the middle of epoch 2 (6 steps per epoch)
        calls["n"] += 1
        if calls["n"] == 6 + 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CoTrainingLoss, "forward", dying_forward)
    assert main(quick(split, *opts)) == 130
    monkeypatch.setattr(CoTrainingLoss, "forward", forward)
    assert main(["--resume", str(split), "--no-progress"]) == 0
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert_tensors_equal(a["model"], b["model"])
    assert_tensors_equal(a["hooks"], b["hooks"])
    assert [r["ema_test_acc_ensemble"] for r in a["history"]] == [r["ema_test_acc_ensemble"] for r in b["history"]]


@pytest.mark.parametrize("option, value, message", [
    ("--label-smoothing", "1.0", "--label-smoothing must be in"),
    ("--ema-decay", "1.5", "--ema-decay must be in"),
    ("--cutmix-alpha", "-1", "--cutmix-alpha must be"),
])
def test_bad_values_name_the_option(option, value, message):
    from_file, from_cli = parse_options([option, value])
    with pytest.raises(ConfigError, match=message):
        make_config(TrainRecipe().to_dict(), from_file, from_cli)


def test_progress_is_left_to_tqdm_unless_asked(monkeypatch, tmp_path):
    import tqdm

    seen = []

    class Spy(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("disable"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Spy)
    def args(out):
        return [a for a in quick(out, "--epochs", "1") if a != "--no-progress"]

    assert main(args(tmp_path / "a")) == 0
    assert main([*args(tmp_path / "b"), "--progress"]) == 0
    assert seen == [None, False]  # None: tqdm shows a bar on a terminal only (here: not a terminal, so none)


def test_print_config_and_a_run_folders_config_json_as_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", "--label-smoothing", "0.05", "--amp", "bf16")) == 0
    saved = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert main(["--config", str(out / "config.json"), "--print-config"]) == 0  # runs nothing
    printed = json.loads(capsys.readouterr().out)
    assert printed == saved
    assert main(["--config", str(out / "config.json"), "--seed", "3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == {**saved, "seed": 3}  # the command line still wins
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_model_names(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("small_cnn", "resnet20", "wrn-16-4", "resnext29-8x64d"):
        assert name in text


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_export_ensemble_is_one_program_of_the_ensemble_without_groupnet_ops(tmp_path, mode):
    from groupnet.ensembling import ensemble
    from groupnet.models import build_model

    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1", "--export-ensemble", "--ensemble", mode)) == 0
    program = torch.export.load(out / "export" / "ensemble.pt2")
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets and not any("groupnet" in t for t in targets), targets
    ckpt = load_ckpt(out / "last.pt")
    model = build_model("small_cnn", branches=2, num_classes=10, in_channels=1)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.randn(5, 1, 8, 8)  # another batch size than the example: the batch dimension is dynamic
    with torch.no_grad():
        expected = ensemble(model(x), 2, mode)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
