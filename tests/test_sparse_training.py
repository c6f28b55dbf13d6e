"""Sparse training in the trainer: options, per-epoch ITOP metrics, the end-of-run table, exact resume, DDP mask
agreement, export carrying the zeros, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from groupnet.train import main
from helpers.train_runs import assert_tensors_equal, load_ckpt, quick

SPARSE = ["--density", "0.3", "--dst", "rigl", "--update-interval", "2"]


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_masks_hold(ckpt):
    """Every masked weight of the checkpoint is zero off its mask, and every (branch, layer) has its count."""
    masking = ckpt["hooks"]["sparse"]["masking"]
    for name, mask in masking["masks"].items():
        w = ckpt["model"][name]
        assert not w[~mask].any(), name
        k = ckpt["recipe"]["branches"]
        counts = mask.reshape(k, -1).sum(1)
        assert (counts == counts[0]).all() and counts[0] >= 1, name
        assert (masking["fired"][name] | mask).equal(masking["fired"][name]), name  # fired covers the mask


def test_rigl_run_logs_itop_rates_and_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quick(out, *SPARSE, "--epochs", "2")) == 0
    printed = capsys.readouterr()
    rows = rows_of(out)
    for row in rows:
        assert row["sparse_density"] == pytest.approx(0.3, abs=2e-3)
        assert {"itop_rate_0", "itop_rate_1", "itop_rate_union", "mask_overlap", "sparse_mask_updates"} <= set(row)
    # 6 steps per epoch, interval 2, updates until 75% of the 12 steps: steps 2, 4, 6, 8
    assert rows[0]["sparse_mask_updates"] == 3 and rows[1]["sparse_mask_updates"] == 4
    assert rows[0]["itop_rate_0"] <= rows[1]["itop_rate_0"] and rows[0]["itop_rate_0"] > 0.3
    assert rows[1]["itop_rate_union"] >= max(rows[1]["itop_rate_0"], rows[1]["itop_rate_1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparse"]["itop_rate"] == [rows[1]["itop_rate_0"], rows[1]["itop_rate_1"]]
    assert "density" in printed.out and "R_s" in printed.out and "R_s" in printed.err
    assert_masks_hold(load_ckpt(out / "last.pt"))


def test_static_masks_keep_r_s_at_the_density(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--density", "0.2", "--dst", "static", "--sparse-init", "uniform", "--branches", "1",
                      "--epochs", "1")) == 0
    row = rows_of(out)[0]
    assert row["itop_rate_0"] == pytest.approx(row["sparse_density"]) and row["sparse_mask_updates"] == 0
    assert row["sparse_density"] == pytest.approx(0.2, abs=2e-3)


def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the LR and drop-rate schedules then do not depend on --epochs
    opts = [*SPARSE, "--lr-schedule", "constant", "--drop-schedule", "constant", "--update-until", "1"]
    assert main(quick(straight, *opts, "--epochs", "2")) == 0
    assert main(quick(split, *opts, "--epochs", "1")) == 0
    assert main(["--resume", str(split), "--epochs", "2", "--no-progress", "--workers", "0"]) == 0
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert_tensors_equal(a["model"], b["model"], "model")
    assert_tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert_tensors_equal(a["hooks"], b["hooks"], "hooks")
    assert a["hooks"]["sparse"]["schedule"]["updates"] == 6


def test_export_carries_the_zeros(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--density", "0.2", "--dst", "set", "--update-interval", "3", "--epochs", "1",
                      "--export-branches")) == 0
    ckpt = load_ckpt(out / "last.pt")
    masks = ckpt["hooks"]["sparse"]["masking"]["masks"]
    for k in range(2):
        program = torch.export.load(out / "export" / f"branch_{k}.pt2")
        params = dict(program.module().named_parameters())
        for name, mask in masks.items():
            assert torch.equal(params[name].reshape(-1) != 0, mask.reshape(2, -1)[k]), (k, name)


@pytest.mark.parametrize("args, message", [
    (["--density", "0"], "--density (fraction of weights kept active; sparsity = 1 - density) must be in (0, 1]"),
    (["--density", "1.5"], "must be in (0, 1], got 1.5"),
    (["--density", "0.5", "--update-interval", "0"], "--update-interval must be >= 1"),
    (["--dst", "set"], "--dst needs --density"),
    (["--density", "0.5", "--drop-rate", "2"], "--drop-rate must be in [0, 1]"),
])
def test_bad_sparse_options_give_a_clear_error(tmp_path, capsys, args, message):
    assert main(quick(tmp_path / "run", *args)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_dst_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--density", "0.5", "--dst", "snip"])
    assert "invalid choice: 'snip'" in capsys.readouterr().err


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


def test_ddp_masks_agree_on_every_process(tmp_path):
    """Two gloo processes: the hook compares the masks' fingerprints after every update and stops on a mismatch."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "groupnet.train", *quick(out, *SPARSE, "--epochs", "1")],
        capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes" in proc.stdout
    ckpt = load_ckpt(out / "last.pt")
    assert ckpt["hooks"]["sparse"]["schedule"]["updates"] == 2  # steps 2 and 4 (until 75% of 6)
    assert_masks_hold(ckpt)


def test_ddp_mask_disagreement_is_detected(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from groupnet.models import build_model
        from groupnet.sparse import Masking
        from groupnet.training.sparse_hook import SparseTrainingHook
        from groupnet.training.config import TrainRecipe
        dist.init_process_group("gloo")
        hook = SparseTrainingHook(TrainRecipe(density=0.5))
        hook.masking = Masking(build_model("small_cnn", branches=2, num_classes=10, in_channels=1), 0.5, seed=0)
        hook.check_agreement()  # same seed: agree
        hook.masking = Masking(build_model("small_cnn", branches=2, num_classes=10, in_channels=1), 0.5,
                               seed=dist.get_rank())
        try:
            hook.check_agreement()
        except RuntimeError as e:
            print(f"detected: {e}", flush=True)  # one write per rank: the ranks share the pipe
        dist.destroy_process_group()
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("detected: sparse masks differ between processes") == 2
