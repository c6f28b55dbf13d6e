"""Branch parallelism (groupnet.training.branch_parallel): 2 and 4 CPU processes (gloo) as a (data x branch) mesh
reproduce the single-process run of the same seed and global batch: weights and optimizer state after a few steps,
the ensemble prediction in every mode, and checkpoints that move between layouts. float64 models, so only the
summation order differs (gathered gradients, the data-parallel all-reduce, synchronised batch norm statistics)."""

from __future__ import annotations

import pytest
import torch

from groupnet.training.branch_parallel import BranchLayout, check_layout, local_views, shard_model
from helpers.branch_parallel_runs import (MODES, bad_layouts, full_model, launch, reference, train_rank)

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
    assert not torch.equal(want["model"]["head.weight"], full_model(results[0]["layout"].branches).state_dict()["head.weight"])


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
    results = launch(2, train_rank, tmp_path, k, 2, "js", 1.0, {"model": one["model"], "optimizer": one["optimizer"]}, 1)
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
