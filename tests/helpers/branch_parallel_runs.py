"""Shared pieces of the branch-parallel tests: the tiny training run (one process or one rank of a mesh) and the
process launcher (torch.multiprocessing spawn, gloo on CPU, a short process-group timeout so that a hang fails)."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from groupnet.cotraining import CoTrainingLoss
from groupnet.ensembling import ensemble
from groupnet.models import build_model, split_weight_decay
from groupnet.training.optim import build_sgd

SEED, CLASSES, BATCH, STEPS = 7, 3, 8, 3
MODES = ("logits", "probs", "geometric")


def batches(k: int, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K-view training batches ``(steps, N, K, 8, 8)``, their labels, and a shared test input ``(N, 1, 8, 8)``."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(steps, BATCH, k, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (steps, BATCH), generator=g)
    test = torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64)
    return x, y, test


def full_model(k: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model("small_cnn", branches=k, num_classes=CLASSES, in_channels=1).double()


def optimizer(model: torch.nn.Module, k: int) -> torch.optim.Optimizer:
    return build_sgd(model, lr=0.2, momentum=0.9, nesterov=True, weight_decay=split_weight_decay(5e-3, k))


def loss_fn(k: int, divergence: str, temperature: float) -> CoTrainingLoss:
    return CoTrainingLoss(k, weight=0.5, divergence=divergence, temperature=temperature)


def reference(k: int, divergence: str = "js", temperature: float = 1.0, steps: int = STEPS,
              resume: dict[str, Any] | None = None, start: int = 0) -> dict[str, Any]:
    """The single-process run: weights, optimizer state and ensemble predictions after ``steps`` steps (from
    ``start``, restoring ``resume`` = {"model", "optimizer"} when given)."""
    x, y, test = batches(k)
    model, fn = full_model(k), loss_fn(k, divergence, temperature)
    opt = optimizer(model, k)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
    for s in range(start, steps):
        opt.zero_grad(set_to_none=True)
        fn(model(x[s]), y[s]).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z = model(test)
        preds = {m: ensemble(z, k, m) for m in MODES}
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "preds": preds}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def launch(world: int, fn, tmp: Path, *args: Any) -> list[dict[str, Any]]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; returns each rank's result (a dict)."""
    mp.spawn(_entry, args=(world, free_port(), fn, str(tmp), args), nprocs=world, join=True)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} failed:\n{res['crash']}"
    return results


# ------------------------------------------------------------------------------------------------ rank workers
def train_rank(rank: int, world: int, k: int, b: int, divergence: str, temperature: float,
               resume: dict[str, Any] | None = None, start: int = 0, save_at: int | None = None) -> dict[str, Any]:
    """One rank of a B-way run over ``world`` ranks: the same steps as :func:`reference`, on this rank's data shard
    and branches; returns the gathered full model and optimizer state and the ensemble predictions."""
    from groupnet.training.branch_parallel import BranchParallel

    bp = BranchParallel(k, b)
    x, y, test = batches(k)
    local = bp.shard(full_model(k))
    opt = optimizer(local, k)
    if resume is not None:
        bp.load_full_state_dict(local, resume["model"])
        bp.load_full_optimizer_state(opt, local, resume["optimizer"])
    fn = loss_fn(k, divergence, temperature)
    n = BATCH // bp.layout.data_size
    rows = slice(bp.layout.data_rank * n, (bp.layout.data_rank + 1) * n)
    saved, losses = None, []
    for s in range(start, STEPS):
        if s == save_at:
            saved = {"model": bp.full_state_dict(local), "optimizer": bp.full_optimizer_state(opt, local)}
        opt.zero_grad(set_to_none=True)
        out, logits = bp.step(local, x[s, rows], y[s, rows], fn)
        assert logits.shape == (n, k * CLASSES)
        losses.append(float(out.loss))
        opt.step()
    local.eval()
    preds = {}
    for m in MODES:
        got = bp.predict(local, test, m)
        assert got is not None
        preds[m] = got[1]
    on_root = bp.predict(local, test, "probs", dst=0)
    assert (on_root is None) == (bp.layout.branch_rank != 0)
    return {"model": bp.full_state_dict(local), "optimizer": bp.full_optimizer_state(opt, local), "preds": preds,
            "root_probs": None if on_root is None else on_root[1], "saved": saved, "losses": losses,
            "layout": bp.layout}


def bad_layouts(rank: int, world: int) -> dict[str, Any]:
    """Each bad layout must raise on this rank (and not hang); a good one afterwards must still work."""
    from groupnet.training.branch_parallel import BranchParallel

    errors = {}
    for name, (k, b) in {"b_not_dividing_k": (4, 3), "world_not_multiple_of_b": (4, 4),
                         "ranks_disagree": (4 if rank == 0 else 2, 2)}.items():
        try:
            BranchParallel(k, b)
        except ValueError as e:
            errors[name] = str(e)
    bp = BranchParallel(2, 2)
    return {"errors": errors, "layout": bp.layout}
