"""Branch parallelism (groupnet.training.branch_parallel): 2 and 4 CPU processes (gloo) as a (data x branch) mesh
reproduce the single-process run of the same seed and global batch: weights and optimizer state after a few steps,
the ensemble prediction in every mode, and checkpoints that move between layouts. float64 models, so only the
summation order differs (gathered gradients, the data-parallel all-reduce, synchronised batch norm statistics)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from groupnet.train import main

from groupnet.training.branch_parallel import BranchLayout, check_layout, local_views, shard_model
from helpers.branch_parallel_runs import MODES, bad_layouts, full_model, launch, reference, train_rank
from helpers.train_runs import load_ckpt, quick

TOL = {"rtol": 1e-9, "atol": 1e-11}


def _assert_state_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, w in want.items():
        g = got[key]
        if isinstance(w, dict):
            _assert_state_equal(g, w, f"{what}/{key}")
        elif isinstance(w, torch.Tensor):
            assert g.shape == w.shape and g.dtype == w.dtype, (what, key)
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{what}/{key}: {m}")
        else:
            assert g == w, (what, key)


def _check_run(results: list[dict], want: dict) -> None:
    for r, res in enumerate(results):
        _assert_state_equal(res["model"], want["model"], f"rank {r} model")
        _assert_state_equal(res["optimizer"]["state"], want["optimizer"]["state"], f"rank {r} optimizer")
        assert res["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        for m in MODES:
            torch.testing.assert_close(res["preds"][m], want["preds"][m], **TOL)
        if res["root_probs"] is not None:
            torch.testing.assert_close(res["root_probs"], want["preds"]["probs"], **TOL)
    # the run moved the weights, so equality above is not the initial state's
    start = full_model(results[0]["layout"].branches).state_dict()
    assert not torch.equal(want["model"]["head.weight"], start["head.weight"])


@pytest.mark.parametrize("k, divergence, temperature", [(2, "js", 1.0), (4, "kl", 2.0)])
def test_two_branch_groups_match_one_process(tmp_path, k, divergence, temperature):
    """2 ranks, B=2; K=4 also saves a full checkpoint after step 1 and a single process resumes it."""
    results = launch(2, train_rank, tmp_path, k, 2, divergence, temperature, None, 0, 1)
    assert [res["layout"].branch_range for res in results] == [range(0, k // 2), range(k // 2, k)]
    want = reference(k, divergence, temperature)
    _check_run(results, want)
    # a checkpoint written by the B=2 run resumes in one process: same end state as the straight run
    saved = results[0]["saved"]
    _assert_state_equal(results[1]["saved"]["model"], saved["model"], "both ranks save the same file")
    resumed = reference(k, divergence, temperature, resume=saved, start=1)
    _assert_state_equal(resumed["model"], want["model"], "resumed in one process")
    _assert_state_equal(resumed["optimizer"]["state"], want["optimizer"]["state"], "resumed optimizer")


def test_one_process_checkpoint_resumes_on_two_branch_groups(tmp_path):
    k = 4
    one = reference(k, steps=1)  # the single-process state after step 0, as a checkpoint holds it
    saved = {"model": one["model"], "optimizer": one["optimizer"]}
    results = launch(2, train_rank, tmp_path, k, 2, "js", 1.0, saved, 1)
    _check_run(results, reference(k))


def test_data_by_branch_mesh_2x2_matches_one_process(tmp_path):
    """4 ranks as (data 2) x (branch 2), K=4: batch norm statistics and gradients over the data dimension."""
    results = launch(4, train_rank, tmp_path, 4, 2, "js", 1.0)
    layouts = [res["layout"] for res in results]
    assert [(lay.data_rank, lay.branch_rank) for lay in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _check_run(results, reference(4))


def test_bad_layouts_fail_on_every_rank_without_hanging(tmp_path):
    results = launch(2, bad_layouts, tmp_path)
    for res in results:
        errors = res["errors"]
        assert "B=3 branch groups must divide the K=4 branches" in errors["b_not_dividing_k"]
        assert "world size 2 must be a multiple of B=4" in errors["world_not_multiple_of_b"]
        assert "ranks disagree on the layout (rank 0: K=4 B=2, rank 1: K=2 B=2)" in errors["ranks_disagree"]
        assert res["layout"].local_branches == 1


def test_layout_checks_and_sharding_in_one_process():
    with pytest.raises(ValueError, match="must divide the K=4"):
        check_layout(4, 3, 3)
    with pytest.raises(ValueError, match="world size 3 must be a multiple of B=2"):
        check_layout(4, 2, 3)
    with pytest.raises(ValueError, match="positive int"):
        BranchLayout(0, 1)
    full = full_model(4)
    parts = [shard_model(full, BranchLayout(4, 2, 2, r)) for r in range(2)]
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    full.eval()
    want = full(x)
    for r, part in enumerate(parts):
        got = part.eval()(local_views(x, BranchLayout(4, 2, 2, r), 1))
        torch.testing.assert_close(got, want[:, r * 6:(r + 1) * 6], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expects \(N, 4, H, W\)"):
        local_views(torch.randn(3, 2, 8, 8), BranchLayout(4, 2, 2, 0), 1)


def _torchrun(tmp_path, module: str, *args: str) -> subprocess.CompletedProcess:
    # torch 2.13 deprecates the differentiable all_reduce the synchronised batch norm uses: keep stderr readable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", module, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=500)


def test_trainer_with_two_branch_groups_matches_one_process_and_checkpoints_move(tmp_path):
    """``torchrun --nproc_per_node 2 -m groupnet.train --branch-parallel 2`` (K=2) against one process: weights,
    optimizer state and metrics; its checkpoint resumes in one process as the single run's own does; and
    ``python -m groupnet.eval --branch-parallel 2`` reports what one process reports."""
    bp, one = tmp_path / "bp", tmp_path / "one"
    proc = _torchrun(tmp_path, "groupnet.train", *quick(bp, "--branch-parallel", "2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(quick(one)) == 0
    a, b = load_ckpt(one / "last.pt"), load_ckpt(bp / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key, v in a["model"].items():
        torch.testing.assert_close(b["model"][key], v, rtol=1e-4, atol=1e-5)
    for i, s in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"],
                                   rtol=1e-4, atol=1e-5)
    rows_a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (bp / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["test_images"] == rb["test_images"]
        for key in ("train_loss", "train_divergence", "test_ce_0", "test_ce_1", "test_ce_ensemble"):
            assert abs(ra[key] - rb[key]) < 1e-4, (ra["epoch"], key, ra[key], rb[key])

    # the B=2 checkpoint continues in one process exactly as the one-process checkpoint does
    for run in (bp, one):
        shutil.copytree(run, tmp_path / f"{run.name}-resumed")
        assert main(["--resume", str(tmp_path / f"{run.name}-resumed"), "--epochs", "3", "--no-progress"]) == 0
    c, d = load_ckpt(tmp_path / "bp-resumed" / "last.pt"), load_ckpt(tmp_path / "one-resumed" / "last.pt")
    for key, v in d["model"].items():
        torch.testing.assert_close(c["model"][key], v, rtol=1e-4, atol=1e-5)

    proc = _torchrun(tmp_path, "groupnet.eval", str(bp), "--branch-parallel", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = subprocess.run([sys.executable, "-m", "groupnet.eval", str(bp)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("K=2")]
    assert table and table == [line for line in single.stdout.splitlines() if line.startswith("K=2")]


def test_trainer_refuses_branch_parallel_it_cannot_lay_out(tmp_path, capsys):
    assert main(quick(tmp_path / "x", "--branch-parallel", "2")) == 2
    assert "world size 1 must be a multiple of B=2" in capsys.readouterr().err
    assert main(quick(tmp_path / "y", "--branch-parallel", "0")) == 2
    assert "--branch-parallel must be >= 1" in capsys.readouterr().err
