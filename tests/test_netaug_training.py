"""``--method netaug`` in the trainer: a run logs the tiny and augmented losses, resumes exactly (the sampler's state
is in the checkpoint), exports each branch's tiny model as a program that loads without groupnet, and refuses bad
options with a clear message."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from groupnet.model_stacking import extract_branch
from groupnet.models import build_model
from groupnet.netaug import make_dynamic
from groupnet.train import main
from helpers.train_runs import assert_tensors_equal, load_ckpt, quick
from test_export import LOADER


def test_a_netaug_run_logs_both_losses_and_exports_the_tiny_branches(tmp_path):
    out = tmp_path / "run"
    k = 2
    assert main(quick(out, "--model", "mobilenetv2_tiny", "--method", "netaug", "--branches", str(k),
                      "--netaug-bn-images", "64", "--export-branches")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["netaug_width_augmented"] for r in rows] == [1.0, 0.0]  # stops after half of the 2 epochs
    assert all(math.isfinite(r["netaug_tiny_loss"]) and math.isfinite(r["netaug_aug_loss"]) for r in rows)
    assert rows[0]["netaug_tiny_loss"] == pytest.approx(rows[0]["train_loss"])

    tiny = build_model("mobilenetv2_tiny", branches=k, num_classes=10, in_channels=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == sum(p.numel() for p in tiny.parameters())  # the kept (tiny) model's size
    big, space = make_dynamic(tiny)
    big.load_state_dict(load_ckpt(out / "last.pt")["model"])
    big.eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped = big(x)  # the minimum configuration: the tiny branches
    torch.save(x, out / "input.pt")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(out), str(k)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = torch.load(out / "outputs.pt", weights_only=True)
    for i in range(k):
        expected = grouped[:, i * 10 : (i + 1) * 10]
        assert torch.allclose(outputs[2 * i], expected, rtol=1e-5, atol=1e-5)
    program = torch.export.load(out / "export" / "branch_0.pt2")
    exported = {n: t.shape for n, t in program.state_dict.items()}
    plain = {n: t.shape for n, t in extract_branch(tiny, 0).state_dict().items() if n in exported}
    assert exported == plain  # the tiny branch's tensors, not the super-model's


def test_a_netaug_run_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # a constant schedule and width augmentation throughout: nothing depends on --epochs
    opts = ("--method", "netaug", "--lr-schedule", "constant", "--netaug-stop", "1", "--netaug-bn-images", "64")
    assert main(quick(straight, "--epochs", "2", *opts)) == 0
    assert main(quick(split, "--epochs", "1", *opts)) == 0
    assert main(["--resume", str(split), "--epochs", "2", "--no-progress", "--workers", "0"]) == 0
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert_tensors_equal(a["model"], b["model"])
    assert_tensors_equal(a["hooks"], b["hooks"])
    assert_tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"])


@pytest.mark.parametrize("extra, message", [
    (("--model", "resnet164"), "no dynamic-width support for family 'resnet' with 'bottleneck' blocks"),
    (("--netaug-width", "0.5", "1"), "--netaug-width must be numbers >= 1"),
    (("--netaug-expand", "1.5", "2"), "--netaug-expand must contain 1"),
    (("--netaug-stop", "1.5"), "--netaug-stop must be a fraction"),
    (("--density", "0.5"), "--method netaug with --density"),
])
def test_bad_netaug_options_are_refused(tmp_path, capsys, extra, message):
    assert main(quick(tmp_path / "run", "--method", "netaug", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_netaug_trains_on_two_processes(tmp_path):
    """Under DDP (2 CPU processes, gloo) the tiny pass runs inside no_sync() and the augmented pass all-reduces;
    every rank draws the same configurations, so the grouped op shapes agree and the run completes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "groupnet.train", *quick(out, "--epochs", "1", "--method", "netaug", "--no-sync-bn",
                                  "--netaug-bn-images", "64")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes" in proc.stdout
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["netaug_aug_loss"])
