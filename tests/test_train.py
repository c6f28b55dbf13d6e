"""The trainer end to end (shortened default run, logs, plot, eval CLI) and its parts (config, optimiser, schedule)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupnet.data import load_dataset
from groupnet.eval import main as eval_main
from groupnet.reference import PerBranch
from groupnet.model_stacking import extract_branch
from groupnet.models import build_model
from groupnet.modules import GroupedBatchNorm2d, GroupedConv2d, GroupedLinear
from groupnet.train import main
from groupnet.training.config import TrainRecipe, make_config, parse_options
from groupnet.training.errors import ConfigError
from groupnet.training.optim import parameter_groups
from groupnet.training.lr_schedule import WarmupCosineLR
from helpers.fake_datasets import make_fake_cifar, write_images
from helpers.train_runs import load_ckpt, quick


def test_default_run_shortened(tmp_path, capsys):
    """The default job (digits, small_cnn, K=2 and the K=1 baseline) with 2 epochs on 256 images."""
    out = tmp_path / "run"
    rc = main(["--epochs", "2", "--train-subset", "256", "--output-dir", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["branches"] == 2 and summary["model"] == "small_cnn" and summary["test_images"] == 360
    base = summary["baseline"]
    assert base["branches"] == 1 and base["params"] > summary["params"] // 2
    # the printed table shows exactly the accuracies the summaries hold
    for i, acc in enumerate(summary["test_acc"]):
        assert f"K=2 branch {i}" in stdout and f"{acc:.2f}" in stdout
    assert "K=2 ensemble (logits)" in stdout and f"{summary['test_acc_ensemble']:.2f}" in stdout
    assert "K=1 baseline" in stdout and f"{base['test_acc_ensemble']:.2f}" in stdout
    # per-epoch logs: JSON lines and CSV agree, with losses, accuracies and throughput
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with open(out / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [1, 2] and len(csv_rows) == 2
    for key in ("train_ce_0", "train_ce_1", "train_divergence", "test_acc_0", "test_acc_1", "test_acc_ensemble",
                "train_images_per_s", "lr", "cot_weight"):
        assert all(math.isfinite(r[key]) for r in rows), key
        assert math.isclose(float(csv_rows[1][key]), rows[1][key], rel_tol=1e-12), key
    assert rows[-1]["test_acc_ensemble"] == summary["test_acc_ensemble"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("last.pt", "best.pt", "config.json", "baseline-k1/last.pt", "baseline-k1/metrics.jsonl"):
        assert (out / f).is_file(), f
    assert load_ckpt(out / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_rgb_data_sets_train_end_to_end(tmp_path, dataset):
    """A CIFAR-style 3-channel pipeline (flip on by default) with a ResNet, on tiny data written in tmp_path."""
    import numpy as np

    data = tmp_path / "data"
    if dataset == "cifar10":
        make_fake_cifar(data, 10, per_file=8)
    else:
        rng = np.random.default_rng(0)
        write_images(data, "train", {"a": 12, "b": 12}, 10, rng)
        write_images(data, "test", {"a": 3, "b": 3}, 10, rng)
    out = tmp_path / "run"
    argv = ["--dataset", dataset, "--data-dir", str(data), "--model", "resnet20", "--batch-size", "8", "--epochs", "1",
            "--threads", "1",
            "--no-progress", "--workers", "2", "--output-dir", str(out)]
    if dataset == "folder":
        argv += ["--image-size", "16"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_images"] == (8 if dataset == "cifar10" else 6) and "baseline" not in summary
    meta = load_ckpt(out / "last.pt")["model_meta"]
    assert (meta["in_channels"], meta["image_size"]) == (3, 32 if dataset == "cifar10" else 16)


def test_training_lowers_the_loss_and_reports_the_reference_accuracy(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "4", "--warmup-epochs", "0", "--lr", "0.1")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_ce_0"] < rows[0]["train_ce_0"] and rows[-1]["train_ce_1"] < rows[0]["train_ce_1"]

    # the reported test accuracies, recomputed with the naive per-branch reference (K plain models in a loop)
    model = build_model("small_cnn", branches=2, num_classes=10, in_channels=1)
    model.load_state_dict(load_ckpt(out / "last.pt")["model"])
    reference = PerBranch([extract_branch(model, k) for k in range(2)], shared_input=True).eval()
    bundle = load_dataset("digits")
    test = bundle.test
    x = (test.images - torch.tensor(bundle.mean).view(1, -1, 1, 1)) / torch.tensor(bundle.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = reference(x).view(len(x), 2, 10)
    accs = [100 * (logits[:, k].argmax(-1) == test.labels).float().mean().item() for k in range(2)]
    ens = 100 * (logits.mean(1).argmax(-1) == test.labels).float().mean().item()
    one_image = 100 / len(test)
    for k in range(2):
        assert abs(rows[-1][f"test_acc_{k}"] - accs[k]) <= one_image + 1e-9, (k, rows[-1][f"test_acc_{k}"], accs[k])
    assert abs(rows[-1]["test_acc_ensemble"] - ens) <= one_image + 1e-9


def test_worker_count_does_not_change_the_result(tmp_path):
    for w in ("0", "2"):
        assert main(quick(tmp_path / w, "--epochs", "1", "--workers", w, "--mixup-alpha", "0.3")) == 0
    a, b = (load_ckpt(tmp_path / w / "last.pt")["model"] for w in ("0", "2"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_trains_the_same_model(tmp_path):
    for name, extra in (("nchw", []), ("nhwc", ["--channels-last"])):
        assert main(quick(tmp_path / name, "--epochs", "1", *extra)) == 0
    a, b = (load_ckpt(tmp_path / n / "last.pt")["model"] for n in ("nchw", "nhwc"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k


def test_branch_major_execution_order_trains_the_same_model(tmp_path):
    for name in ("grouped", "branch"):
        assert main(quick(tmp_path / name, "--epochs", "1", "--execution-order", name)) == 0
    a, b = (load_ckpt(tmp_path / n / "last.pt")["model"] for n in ("grouped", "branch"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k


def test_eval_cli_reproduces_the_final_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quick(out, "--ensemble", "probs")) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert eval_main([str(out / "last.pt"), "--batch-size", "50"]) == 0
    printed = capsys.readouterr().out
    assert "K=2 ensemble (probs)" in printed
    for acc in [*summary["test_acc"], summary["test_acc_ensemble"]]:
        assert f"{acc:.2f}" in printed
    # evaluate-only through the trainer writes no checkpoint
    before = (out / "last.pt").read_bytes()
    assert main(["--resume", str(out), "--evaluate", "--no-progress"]) == 0
    assert (out / "last.pt").read_bytes() == before


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_sets_options_and_the_command_line_wins(tmp_path, suffix):
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".yaml":
        path.write_text("epochs: 7\nbranches: 3\nlr: 1\nmixup-alpha: 0.2\nflip: true\n")
    else:
        path.write_text("epochs = 7\nbranches = 3\nlr = 1\nmixup_alpha = 0.2\nflip = true\n")
    from_file, from_cli = parse_options(["--config", str(path), "--branches", "4"])
    cfg, _ = make_config(TrainRecipe().to_dict(), from_file, from_cli)
    assert (cfg.epochs, cfg.branches, cfg.lr, cfg.mixup_alpha, cfg.flip) == (7, 4, 1.0, 0.2, True)
    assert cfg.model == TrainRecipe().model  # untouched options keep their defaults
    path.write_text("epochs: seven\n" if suffix == ".yaml" else 'epochs = "seven"\n')
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        parse_options(["--config", str(path)])
    path.write_text("epoch: 3\n" if suffix == ".yaml" else "epoch = 3\n")
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        parse_options(["--config", str(path)])


# ----------------------------------------------------------------------------------------------- optimisation


def test_weight_decay_skips_norm_layers_and_biases():
    model = build_model("resnet20", branches=2, num_classes=10)
    decay, no_decay = (set(map(id, g["params"])) for g in parameter_groups(model, 0.1))
    expected_decay = {id(m.weight) for m in model.modules() if isinstance(m, (GroupedConv2d, GroupedLinear))}
    assert decay == expected_decay
    bn_and_bias = {id(p) for m in model.modules() if isinstance(m, GroupedBatchNorm2d) for p in m.parameters()}
    bn_and_bias |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert no_decay == bn_and_bias and not decay & no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


@settings(max_examples=30)
@given(total=st.integers(2, 300), warm_frac=st.floats(0, 0.9), lr=st.floats(0.01, 1), warm_lr=st.floats(0, 0.01),
       min_lr=st.floats(0, 0.01))
def test_lr_schedule_warms_up_linearly_then_decays_to_min(total, warm_frac, lr, warm_lr, min_lr):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=123.0)
    warm = int(warm_frac * total)
    sched = WarmupCosineLR(opt, lr=lr, total_steps=total, warmup_steps=warm, warmup_lr=warm_lr, min_lr=min_lr)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert math.isclose(lrs[0], warm_lr if warm else lr, abs_tol=1e-12)
    assert math.isclose(lrs[warm], lr, rel_tol=1e-9)
    for s in range(1, warm):  # linear: equal increments
        assert math.isclose(lrs[s] - lrs[s - 1], (lr - warm_lr) / warm, rel_tol=1e-6, abs_tol=1e-12)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[warm:], lrs[warm + 1 :]))  # non-increasing after warm-up
    assert math.isclose(lrs[total], min_lr, abs_tol=1e-12)
    restored = WarmupCosineLR(opt, lr=lr, total_steps=total, warmup_steps=warm, warmup_lr=warm_lr, min_lr=min_lr)
    restored.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == lrs[total]


def test_unknown_schedule_in_a_config_is_named():
    with pytest.raises(ConfigError, match="--schedule must be one of"):
        make_config(TrainRecipe().to_dict(), {"schedule": "sideways"})


def test_lr_schedule_is_a_torch_lr_scheduler_and_resumes_exactly_from_either_state_format():
    from torch.optim.lr_scheduler import LRScheduler

    params = [torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD([{"params": params}, {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    sched = WarmupCosineLR(opt, lr=0.1, total_steps=20, warmup_steps=5, warmup_lr=0.01, min_lr=0.001)
    assert isinstance(sched, LRScheduler)
    seen = []
    for _ in range(12):
        opt.step()
        sched.step()
        seen.append(sched.get_last_lr())
    assert sched.last_epoch == sched.step_count == 12
    assert all(len(lrs) == 2 and lrs[0] == lrs[1] for lrs in seen)
    assert seen[-1] == [g["lr"] for g in opt.param_groups] == [sched.lr_at(12)] * 2
    for state in (sched.state_dict(), {"step_count": 12}):  # the current format and the former one
        opt2 = torch.optim.SGD([{"params": params}, {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
        resumed = WarmupCosineLR(opt2, lr=0.1, total_steps=20, warmup_steps=5, warmup_lr=0.01, min_lr=0.001)
        resumed.load_state_dict(state)
        assert resumed.get_last_lr() == sched.get_last_lr()
        for _ in range(8):
            opt.step(), sched.step(), opt2.step(), resumed.step()
            assert resumed.get_last_lr() == sched.get_last_lr()  # exactly, not approximately
        sched.load_state_dict({"last_epoch": 12})
