"""Branch parallelism on this machine: per-step time and peak memory per rank for B = 1, 2 (and more when asked),
with the communication volume per step computed from the layout.

Every B runs the same global batch of the same K-branch model as B processes (gloo, one torch thread each), rank b
holding K/B branches (``groupnet.training.branch_parallel``). Per rank: two warm-up steps (gradients, momentum and
oneDNN caches come to exist), then freed memory goes back to the OS and the kernel's peak-RSS mark is reset, then
``--steps`` timed steps. Reported per rank: median wall-clock ms per step, median process-CPU ms per step (not
counting time the process waits descheduled or blocked in a collective), the peak RSS rise over the timed steps
(activations, gradients in flight, temporaries) and the persistent bytes of weights + gradients + momentum.
Communication per step and rank, computed (ring collectives): the logits all-gather over the branch dimension in
the forward and its gradient in the backward, ``2 (B-1) * K/B * N * C * 4`` bytes, plus the data-dimension gradient
all-reduce (0 here: no data parallelism in this benchmark).

    python benchmarks/branch_parallel.py --model resnet20 --branches 4 --batch 32 --image 32 --steps 5 --groups 1 2

What a 2-core machine can and cannot show: see ``benchmarks/NOTES.md`` ("Branch parallelism").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peak_rss import peak_rss_rise_bytes, reset_peak_rss  # noqa: E402


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=5))
    from groupnet.cotraining import CoTrainingLoss
    from groupnet.models import build_model
    from groupnet.training.branch_parallel import BranchParallel
    from groupnet.training.optim import build_sgd

    k, n, c, size = args.branches, args.batch, args.classes, args.image
    bp = BranchParallel(k, world)
    torch.manual_seed(0)
    model = bp.shard(build_model(args.model, branches=k, num_classes=c, in_channels=3))
    model = model.to(memory_format=torch.channels_last)
    opt = build_sgd(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = CoTrainingLoss(k, weight=0.5, check_finite=False, check_targets=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, k * 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, c, (n,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        bp.step(model, x, y, loss_fn)
        opt.step()

    step()
    step()
    before = reset_peak_rss()
    walls, cpus = [], []
    for _ in range(args.steps):
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    peak_rise = peak_rss_rise_bytes(before)
    params = sum(p.numel() for p in model.parameters())
    comm = bp.communication_bytes(n // bp.layout.data_size, c, params)
    result = {"B": world, "rank": rank, "branches_held": list(bp.layout.branch_range), "params": params,
              "persistent_bytes": 3 * params * 4, "wall_ms": 1e3 * statistics.median(walls),
              "cpu_ms": 1e3 * statistics.median(cpus), "peak_rss_rise_bytes": peak_rise, "comm": comm}
    Path(out, f"B{world}-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="the global batch (every B trains on all of it)")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2], help="the values of B to run")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for b in args.groups:
            mp.spawn(_rank, args=(b, _free_port(), args, out), nprocs=b, join=True)
            rows += [json.loads(Path(out, f"B{b}-rank{r}.json").read_text()) for r in range(b)]
    print(f"{args.model} K={args.branches}, global batch {args.batch}, {args.image}x{args.image}, fp32, 1 thread "
          f"per rank, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| B | rank | branches | params | weights+grads+momentum MiB | step wall ms | step CPU ms | "
          "peak RSS rise MiB | logits all-gather KiB (fwd + bwd) | gradient all-reduce KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["comm"]
        print(f"| {r['B']} | {r['rank']} | {r['branches_held']} | {r['params']:,} | "
              f"{r['persistent_bytes'] / 2**20:.2f} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} | "
              f"{r['peak_rss_rise_bytes'] / 2**20:.1f} | "
              f"{(c['logits_all_gather'] + c['logits_grad_backward']) / 1024:.1f} | "
              f"{c['gradient_all_reduce'] / 1024:.1f} |")
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
