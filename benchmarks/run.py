"""Run every benchmark and write benchmarks/RESULTS.md (pytest-benchmark JSON beside it as results.json).

    python benchmarks/run.py            # the full suite (7 minutes on a quiet 2-core dev machine with a warm
                                        # torch.compile cache, 15 with a cold one)
    python benchmarks/run.py --quick    # a subset (K=2, smallest batches, no torch.compile peers), one round
                                        # each, quiet: checks that everything runs; numbers meaningless
    python benchmarks/run.py -k "resnet56 and K2"   # a subset (pytest -k), written to the same files

Threads: GROUPNET_BENCH_THREADS (default: all cores). Run it on a quiet machine: the load average at start and end
is written into RESULTS.md. Peers that cannot run in this environment (torch-uncertainty) are listed as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Quiet profiler: kineto writes two "USDT: ... profiler_start/stop" lines to stderr for every profiled call (the op
# counts) below its highest log level. Set before torch is imported, and inherited by the benchmark processes.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402

import results_markdown  # noqa: E402
from cases import ARCHS, BRANCHES, glibc_default, rounds_summary, set_threads  # noqa: E402

MEMORY_BATCH = 128
MEMORY_PEERS = ("groupnet", "loop-cl", "dense")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("groupnet", "triton", "torch_uncertainty", "torchvision", "pytest_benchmark"):
        try:
            mod = __import__(name)
            parts.append(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def run_pytest(json_path: Path, keyword: str | None, env: dict[str, str]) -> int:
    cmd = [sys.executable, "-m", "pytest", str(HERE / "bench_ops.py"), str(HERE / "bench_models.py"), "-q",
           "-p", "no:cacheprovider", f"--benchmark-json={json_path}", "--benchmark-columns=min,median,rounds",
           "--benchmark-sort=name", "-rs"]
    if keyword:
        cmd += ["-k", keyword]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=HERE.parent, env=env)


def op_counts(quick: bool = False) -> list[list[str]]:
    import groupnet as gn
    from groupnet.fuse import fuse_for_inference
    from groupnet.models import build_model
    from groupnet.opcount import operator_calls

    rows = []
    for arch in ARCHS[:1] if quick else ARCHS:
        for k in (1, BRANCHES[0]) if quick else (1, *BRANCHES):
            torch.manual_seed(0)
            model = build_model(arch, branches=k, num_classes=10).to(memory_format=torch.channels_last)
            x = torch.randn(2, 3 * k, 32, 32).contiguous(memory_format=torch.channels_last)
            ours = operator_calls(model, x)
            with torch.no_grad():
                fused = operator_calls(fuse_for_inference(model), x)
            loop = operator_calls(gn.reference_of(model).to(memory_format=torch.channels_last), x)
            rows.append([arch, str(k), str(ours.top_level), str(ours.total), str(fused.top_level),
                         str(loop.top_level), str(loop.total)])
    return rows


def memory_rows(env: dict[str, str], quick: bool = False) -> list[list[str]]:
    rows, batch = [], 8 if quick else MEMORY_BATCH
    for arch in ARCHS[:1] if quick else ARCHS:
        for k in BRANCHES[:1] if quick else BRANCHES:
            mib = {}
            for peer in MEMORY_PEERS:
                out = subprocess.run([sys.executable, str(HERE / "memory.py"), arch, str(k), str(batch), peer],
                                     capture_output=True, text=True, env=env, cwd=HERE.parent)
                if out.returncode:
                    raise RuntimeError(f"memory.py {arch} {k} {peer} failed:\n{out.stderr}")
                mib[peer] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_delta_bytes"] / 2**20
            rows.append([f"{arch}-K{k}-b{batch}-train", f"{mib['groupnet']:.0f}", f"{mib['loop-cl']:.0f}",
                         f"{mib['dense']:.0f}", f"{mib['groupnet'] / mib['loop-cl']:.2f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a small subset, one round per case: checks the suite runs (numbers meaningless)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression: run a subset")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the markdown file to write")
    parser.add_argument("--no-extras", action="store_true", help="skip the op counts and the memory runs")
    args = parser.parse_args()

    if args.quick:  # here too: the header's rounds summary reads it
        os.environ["GROUPNET_BENCH_QUICK"] = "1"
    env = dict(os.environ)
    threads = set_threads()
    env["GROUPNET_BENCH_THREADS"] = str(threads)
    output = Path(args.output)
    json_path = output.with_name("results.json" if output.name == "RESULTS.md" else output.stem + ".json")

    load_start, t0 = os.getloadavg(), time.time()
    rc = run_pytest(json_path, args.keyword, env)
    if rc not in (0, 5):
        print(f"pytest failed (exit {rc}); RESULTS not written", file=sys.stderr)
        return rc
    counts = memory = None
    if not args.no_extras:
        counts = op_counts(args.quick)
        memory = memory_rows(env, args.quick)
    load_end, minutes = os.getloadavg(), (time.time() - t0) / 60
    bench = json.loads(json_path.read_text())
    from peers import torch_uncertainty_missing

    missing = torch_uncertainty_missing()
    skipped = f"packed-tu skipped: {missing} (see CONTRIBUTING)" if missing else "packed-tu ran (torch-uncertainty)"
    header = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads}, {platform.platform()}",
        f"- versions: {versions()}",
        f"- load average (1, 5, 15 min) at start {tuple(round(v, 2) for v in load_start)}, "
        f"at end {tuple(round(v, 2) for v in load_end)}; suite took {minutes:.1f} min",
        f"- command: `python benchmarks/run.py{' --quick' if args.quick else ''}"
        f"{' -k ' + repr(args.keyword) if args.keyword else ''}`; rounds (`benchmarks/cases.py`): {rounds_summary()}",
        f"- {skipped}",
        "- fp32, channels_last for every peer except loop-nchw and vmap; CPU only (no GPU number here)",
        "- glibc malloc default (GROUPNET_BENCH_GLIBC_DEFAULT=1)" if glibc_default()
        else "- freed memory retained by glibc malloc for every peer (`groupnet.cpu_memory.retain_freed_memory`, "
        "as `groupnet.train` runs on CPU; benchmarks/NOTES.md item 8)",
    ]
    output.write_text(results_markdown.render(bench, header, counts, memory))
    print(f"wrote {output} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
