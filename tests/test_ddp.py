"""DistributedDataParallel: 2 CPU processes (torchrun, gloo) reproduce the single-process run with the same global
batch. Batch norm statistics are synchronised across the processes (groupnet.training.distributed) and the data
order is split by rank within each global batch, so the runs see the same images and statistics; only
floating-point summation order differs. Augmentation is off here: each process draws the views of its share of the
batch in one batched pass (groupnet.data.views), so augmented views depend on the process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from groupnet.models import build_model
from groupnet.model_stacking import extract_branch
from groupnet.train import main
from groupnet.training.distributed import convert_sync_batchnorm, revert_sync_batchnorm
from helpers.train_runs import load_ckpt, quick


@pytest.mark.parametrize("execution_order", ["grouped", "branch"])
def test_two_processes_match_one_process(tmp_path, execution_order):
    opts = ["--epochs", "2", "--batch-size", "32", "--padding", "0", "--execution-order", execution_order]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "groupnet.train", *quick(multi, *opts)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes" in proc.stdout
    # the synchronised batch norm uses torch's current collectives: no deprecation warnings
    assert "FutureWarning" not in proc.stderr and "DeprecationWarning" not in proc.stderr, proc.stderr[-4000:]
    assert main(quick(single, *opts)) == 0

    a, b = load_ckpt(single / "last.pt"), load_ckpt(multi / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        w = b["model"][k]
        if v.is_floating_point():  # weights and BN running statistics
            assert torch.allclose(v, w, rtol=1e-4, atol=1e-5), (k, (v - w).abs().max())
        else:
            assert torch.equal(v, w), k
    rows_a = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    # losses, not accuracies: after 12 steps many test logits are near-ties whose argmax rounding may flip
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("train_loss", "train_divergence", "test_ce_0", "test_ce_1", "test_ce_ensemble"):
            assert abs(ra[key] - rb[key]) < 1e-4, (ra["epoch"], key, ra[key], rb[key])


def test_sync_batchnorm_conversion_is_transparent_in_one_process():
    model = build_model("resnet20", branches=2, num_classes=10)
    x = torch.randn(4, 6, 8, 8)
    reference = build_model("resnet20", branches=2, num_classes=10)
    reference.load_state_dict(model.state_dict())
    convert_sync_batchnorm(model)
    assert any(type(m).__name__.startswith("SyncGrouped") for m in model.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert torch.equal(model(x), reference(x))  # training mode, no process group: plain batch norm
    for (n, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), n  # same running-statistics update
    branch = extract_branch(model, 1)
    assert not any(type(m).__name__.startswith("Sync") for m in branch.modules())
    revert_sync_batchnorm(model)
    assert not any(type(m).__name__.startswith("Sync") for m in model.modules())


def test_branch_major_runs_synchronised_batch_norms_per_branch():
    from groupnet.branch_major import branch_major_forward

    model = build_model("resnet20", branches=2, num_classes=10)
    x = torch.randn(4, 6, 8, 8)
    branch_major_forward(model, x)  # a plan made before the conversion must not be reused after it
    convert_sync_batchnorm(model)
    reference = build_model("resnet20", branches=2, num_classes=10)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(branch_major_forward(model, x), reference(x))
    plan = model.__dict__["_groupnet_branch_major"]
    norms = [type(m).__name__ for m in plan.skeleton.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(n == "SyncBatchNorm2d" for n in norms), norms
