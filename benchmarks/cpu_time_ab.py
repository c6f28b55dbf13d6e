"""The A/B experiments of NOTES.md: candidates interleaved, timed single-threaded in process CPU time.

With the default 1 thread, process CPU time does not count the time the process waits for a core, so these rank
candidates by the work they do even on a loaded machine. They cannot show 2-thread scaling: ``--threads 2`` switches
to wall time, meaningful only on a quiet machine (RESULTS.md is the wall-clock run of the whole suite).

    python benchmarks/cpu_time_ab.py conv-passes            # every conv shape: grouped vs loop, per pass
    python benchmarks/cpu_time_ab.py inference              # loop / grouped / fused / shared input / dense
    python benchmarks/cpu_time_ab.py train groupnet,loop-cl,dense resnet56:2:8 wrn-16-4:4:8
    python benchmarks/cpu_time_ab.py --threads 2 execution-order - wrn-16-4:4:128:train  # grouped / branch-major / loop
    python benchmarks/cpu_time_ab.py --threads 2 threads    # grouped conv vs K branch convs on K Python threads
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import groupnet as gn  # noqa: E402
from groupnet.fuse import fuse_for_inference  # noqa: E402
from groupnet.models import build_model  # noqa: E402

from cases import ARCHS, BRANCHES, ModelCase  # noqa: E402

CL = torch.channels_last
aten = torch.ops.aten


CLOCK = time.process_time


def interleaved_min(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Minimum ms of each candidate (process CPU time, or wall time with --threads > 1) over ``reps`` interleaved
    rounds, after two warm-up calls each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = CLOCK()
            f()
            times[k].append((CLOCK() - t) * 1e3)
    return {k: min(v) for k, v in times.items()}


def conv_shapes(arch: str, k: int, batch: int) -> Counter:
    """(N, K, Cin, Cout, kernel, stride, padding, H) of every grouped conv in the model, with multiplicity."""
    model, shapes = build_model(arch, branches=k, num_classes=10), []

    def hook(mod, inputs, _):
        shapes.append((batch, k, mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
                       mod.padding[0], inputs[0].shape[2]))

    for m in model.modules():
        if isinstance(m, gn.GroupedConv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3 * k, 32, 32))
    return Counter(shapes)


def conv_passes(reps: int) -> None:
    for arch in ARCHS:
        for k in BRANCHES:
            for batch in (8, 128):
                for shape, count in conv_shapes(arch, k, batch).items():
                    n, _, cin, cout, ks, s, p, h = shape
                    x = torch.randn(n, k * cin, h, h).contiguous(memory_format=CL)
                    w = (torch.randn(k * cout, cin, ks, ks) * 0.1).contiguous(memory_format=CL)
                    g = torch.randn_like(F.conv2d(x, w, None, s, p, 1, k))
                    parts = [(x[:, i * cin:(i + 1) * cin], w[i * cout:(i + 1) * cout], g[:, i * cout:(i + 1) * cout])
                             for i in range(k)]

                    def bwd(mask, grouped):
                        if grouped:
                            return lambda: aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False,
                                                                     [0, 0], k, mask)
                        return lambda: [aten.convolution_backward(gi, xi, wi, None, [s, s], [p, p], [1, 1], False,
                                                                  [0, 0], 1, mask) for xi, wi, gi in parts]

                    r = interleaved_min({
                        "fwd g": lambda: F.conv2d(x, w, None, s, p, 1, k),
                        "fwd l": lambda: torch.cat([F.conv2d(xi, wi, None, s, p) for xi, wi, _ in parts], 1),
                        "dx g": bwd([True, False, False], True), "dx l": bwd([True, False, False], False),
                        "dw g": bwd([False, True, False], True), "dw l": bwd([False, True, False], False),
                    }, reps)
                    cols = " | ".join(f"{a} {r[a + ' g']:.2f} / {r[a + ' l']:.2f}" for a in ("fwd", "dx", "dw"))
                    print(f"{arch} {shape} x{count} | {cols}", flush=True)


def inference(reps: int) -> None:
    for arch in ARCHS:
        for k in BRANCHES:
            for batch in (1, 8):
                torch.manual_seed(0)
                model = build_model(arch, branches=k, num_classes=10).eval().to(memory_format=CL)
                dense = build_model(arch, branches=1, num_classes=10).eval().to(memory_format=CL)
                fused, loop = fuse_for_inference(model), gn.reference_of(model).eval().to(memory_format=CL)
                x = torch.randn(batch, 3 * k, 32, 32).contiguous(memory_format=CL)
                shared = x[:, :3].contiguous(memory_format=CL)

                def call(mod, inp):
                    def run():
                        with torch.inference_mode():
                            return mod(inp)
                    return run

                r = interleaved_min({"loop": call(loop, x), "grouped": call(model, x), "fused": call(fused, x),
                                     "fused shared input": call(fused, shared), "dense": call(dense, shared)}, reps)
                print(f"{arch} K={k} batch={batch}: " + ", ".join(f"{a} {v:.1f}" for a, v in r.items()), flush=True)


def train(peers: list[str], specs: list[str], reps: int) -> None:
    from peers import make_runner

    for spec in specs:
        arch, k, batch = spec.split(":")
        case = ModelCase(arch, int(k), int(batch), "train")
        r = interleaved_min({p: make_runner(p, case) for p in peers}, reps)
        print(f"{case.id}: " + ", ".join(f"{p} {v:.1f}" for p, v in r.items()), flush=True)


def execution_order(specs: list[str], reps: int) -> None:
    """NOTES.md item 8: one model run grouped, branch-major and as a loop of K plain models (eager, not fused; the
    step of the benchmarks, ``peers.step_runner``)."""
    from peers import plain, step_runner

    for spec in specs:
        arch, k, batch, mode = spec.split(":")
        k, batch = int(k), int(batch)
        torch.manual_seed(0)
        x = torch.randn(batch, 3 * k, 32, 32).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (batch,))
        runs = {}
        for name in ("grouped", "branch", "loop"):
            model = build_model(arch, branches=k, num_classes=10).to(memory_format=CL)
            model.execution_order = "grouped" if name == "grouped" else "branch"
            if name == "loop":
                model = gn.reference_of(model).to(memory_format=CL)
            runs[name] = step_runner(plain(model, x, k), y, mode)
        r = interleaved_min(runs, reps)
        print(f"{spec}: " + ", ".join(f"{a} {v:.1f}" for a, v in r.items()), flush=True)


THREAD_SHAPES = ((1, 2, 48, 32), (8, 2, 48, 32), (1, 4, 32, 32), (8, 4, 32, 32), (8, 2, 96, 16), (8, 4, 8, 32),
                 (1, 2, 12, 32), (8, 2, 12, 32))


def threads(reps: int) -> None:
    """NOTES.md item 3: one grouped 3x3 conv (all threads) vs K branch convs on K Python threads (1 thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    n_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(max(k for _, k, _, _ in THREAD_SHAPES))
    for n, k, c, h in THREAD_SHAPES:
        x = torch.randn(n, k * c, h, h).contiguous(memory_format=CL)
        w = torch.randn(k * c, c, 3, 3).contiguous(memory_format=CL)
        xs = [t.contiguous(memory_format=CL) for t in x.chunk(k, 1)]
        ws = list(w.chunk(k, 0))

        def on_threads():
            torch.set_num_threads(1)
            futures = [pool.submit(F.conv2d, xs[i], ws[i], None, 1, 1) for i in range(k)]
            out = torch.cat([f.result() for f in futures], 1)
            torch.set_num_threads(n_threads)
            return out

        r = interleaved_min({
            "grouped": lambda: F.conv2d(x, w, None, 1, 1, 1, k),
            "threads": on_threads,
            "loop": lambda: torch.cat([F.conv2d(xs[i], ws[i], None, 1, 1) for i in range(k)], 1),
        }, reps)
        print(f"N={n} K={k} C={c} H={h}: " + ", ".join(f"{a} {v:.3f}" for a, v in r.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["conv-passes", "inference", "train", "execution-order", "threads"])
    parser.add_argument("peers", nargs="?", default="groupnet,loop-cl,dense",
                        help="train: comma-separated peers ('-' for execution-order)")
    parser.add_argument("cases", nargs="*", help="train: ARCH:K:BATCH [resnet56:2:8 wrn-16-4:2:8]; "
                        "execution-order: ARCH:K:BATCH:train|infer [wrn-16-4:4:8:train wrn-16-4:4:128:train]")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; above 1 the clock is wall time (only meaningful on a quiet machine)")
    args = parser.parse_args()
    global CLOCK
    gn.retain_freed_memory()  # as the benchmark suite and groupnet.train do (NOTES.md item 8)
    torch.set_num_threads(args.threads)
    if args.threads > 1:
        CLOCK = time.perf_counter
    if args.experiment == "conv-passes":
        conv_passes(args.reps)
    elif args.experiment == "inference":
        inference(args.reps)
    elif args.experiment == "execution-order":
        execution_order(args.cases or ["wrn-16-4:4:8:train", "wrn-16-4:4:128:train"], args.reps)
    elif args.experiment == "threads":
        threads(args.reps)
    else:
        train(args.peers.split(","), args.cases or ["resnet56:2:8", "wrn-16-4:2:8"], args.reps)


if __name__ == "__main__":
    main()
