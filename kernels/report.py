"""Offline report on groupnet's Triton kernels: compile for sm_80/sm_90 without a GPU, and the resources used.

``python -m groupnet.kernels.report`` prints, for every kernel module of ``groupnet.kernels``:

1. Resources: each ``CompileSpec`` from the module's ``compile_specs()`` (every ``@triton.jit`` kernel x autotune
   config x dtype signature) is compiled with ``triton.compile`` for ``GPUTarget("cuda", cc, 32)``; the report gives
   static shared memory (triton's metadata), registers and spill bytes (``ptxas -v`` on the PTX, with the ptxas
   bundled in the triton wheel) and whether the PTX uses ``wgmma``.
Roofline estimates for the shapes of real models are ``python -m groupnet.roofline`` (the kernels know no model).

Must run WITHOUT ``TRITON_INTERPRET`` (the interpreter makes ``@triton.jit`` functions uncompilable).

Protocol for kernel modules (a module in ``kernels/`` takes part by defining these functions):

- ``compile_specs() -> list[CompileSpec]`` (see ``kernels/_common.py``): required for the compile checks.
- ``roofline_cases(workloads) -> list[dict]`` (optional): one dict per launch of the given shapes, with keys
  ``name`` (str), ``flops`` (float, useful floating-point ops: 2 per multiply-add), ``bytes`` (float, the minimum
  bytes the launch must move to/from HBM: every input read once, every output written once), ``dtype``
  (``"bf16"``, ``"fp16"``, ``"tf32"`` or ``"fp32"``: picks the peak used for the compute floor), and optionally
  ``notes`` (str). Read by ``python -m groupnet.roofline``.

``--check`` exits non-zero when a spec fails to compile, exceeds ``SHARED_MEMORY_LIMIT[cc]``, spills registers, or
(sm_90 only) feeds 16-bit operands to ``tl.dot`` (``CompileSpec.dot_dtype``) without producing ``wgmma``.
``--json`` prints one JSON object (``{"results": [...], "failures": [...], "modules": [...]}``) instead of tables.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS_RE = re.compile(r"Used (\d+) registers")
TARGET_RE = re.compile(r"^\.target\s+(\S+)", re.MULTILINE)


def kernel_module_names() -> list[str]:
    """Every module of ``groupnet.kernels`` (this report excluded), imported or not."""
    import groupnet.kernels as pkg

    return sorted(
        f"{pkg.__name__}.{info.name}"
        for info in pkgutil.iter_modules(pkg.__path__)
        if not info.ispkg and info.name != "report"
    )


def modules_with(attribute: str, only: list[str] | None = None) -> list[str]:
    """Names of the kernel modules that define ``attribute`` (importing each); ``only``: short names to keep."""
    names = [n for n in kernel_module_names() if only is None or n.rsplit(".", 1)[-1] in only]
    return [name for name in names if hasattr(importlib.import_module(name), attribute)]


def bundled_ptxas() -> list[str]:
    """The ptxas binaries shipped in the triton wheel, in the order to try them."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [p for p in (os.path.join(bin_dir, n) for n in ("ptxas", "ptxas-blackwell")) if os.path.exists(p)]


def ptxas_resources(ptx: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the first bundled ptxas that accepts the PTX)."""
    gpu_name = TARGET_RE.search(ptx).group(1)
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in bundled_ptxas():
            run = subprocess.run(
                [ptxas, "-v", f"--gpu-name={gpu_name}", src, "-o", dst], capture_output=True, text=True
            )
            if run.returncode == 0:
                log = run.stdout + run.stderr
                spills = SPILL_RE.search(log)
                return {
                    "ptxas": os.path.basename(ptxas),
                    "registers": int(REGISTERS_RE.search(log).group(1)),
                    "spill_stores": int(spills.group(1)),
                    "spill_loads": int(spills.group(2)),
                }
            errors.append(f"{os.path.basename(ptxas)}: {run.stderr.strip()[:300]}")
    raise RuntimeError("no bundled ptxas accepted the PTX: " + " | ".join(errors))


def _compile_one(job: tuple[str, int, int]) -> dict:
    """Compile spec ``index`` of ``module`` for ``capability``; runs in a worker process."""
    from groupnet.kernels._common import SHARED_MEMORY_LIMIT

    module, index, capability = job
    spec = importlib.import_module(module).compile_specs()[index]
    record = {
        "module": module.rsplit(".", 1)[-1],
        "name": spec.name,
        "capability": capability,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "dot_dtype": spec.dot_dtype,
        "shared_limit": SHARED_MEMORY_LIMIT[capability],
        "error": None,
    }
    start = time.perf_counter()
    try:
        compiled = spec.compile(capability)
        ptx = compiled.asm["ptx"]
        record.update(shared=compiled.metadata.shared, wgmma="wgmma" in ptx, **ptxas_resources(ptx))
    except Exception as exc:  # reported, and a failure under --check
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    record["compile_s"] = round(time.perf_counter() - start, 3)
    return record


def compile_jobs(
    capabilities: list[int], sm80_subset: bool, only: list[str] | None = None
) -> list[tuple[str, int, int]]:
    """(module, spec index, capability) for every spec; with ``sm80_subset``, sm_80 gets one spec per variant
    (kernel, signature, constexprs other than BLOCK*/GROUP*/SPLIT*/NUM_*): the one with the largest
    num_stages x product of BLOCK* sizes, the likeliest to exceed sm_80's smaller shared memory."""
    jobs = []
    for module in modules_with("compile_specs", only):
        specs = importlib.import_module(module).compile_specs()
        for capability in capabilities:
            indices = range(len(specs))
            if capability == 80 and sm80_subset:
                chosen: dict[tuple, int] = {}
                for i, spec in enumerate(specs):
                    key = _variant_key(spec)
                    best = chosen.get(key)
                    if best is None or _smem_rank(spec) > _smem_rank(specs[best]):
                        chosen[key] = i
                indices = sorted(chosen.values())
            jobs.extend((module, i, capability) for i in indices)
    return jobs


TILE_CONSTEXPR_PREFIXES = ("BLOCK", "GROUP", "SPLIT", "NUM_")


def _variant_key(spec) -> tuple:
    """What a spec compiles apart from its tile config: kernel, signature and non-tile constexprs."""
    fixed = {k: str(v) for k, v in spec.constexprs.items() if not k.startswith(TILE_CONSTEXPR_PREFIXES)}
    name = getattr(spec.fn, "__name__", spec.name)
    return (name, spec.dot_dtype, str(sorted(spec.signature.items())), str(sorted(fixed.items())))


def _smem_rank(spec) -> int:
    blocks = [v for k, v in spec.constexprs.items() if k.startswith("BLOCK") and isinstance(v, int)]
    size = 1
    for b in blocks:
        size *= b
    return spec.num_stages * size


def failures_of(record: dict) -> list[str]:
    """Why a compiled spec fails the checks (empty when it passes)."""
    where = f"{record['module']}:{record['name']} sm_{record['capability']}"
    if record["error"]:
        return [f"{where}: compile error: {record['error']}"]
    out = []
    if record["shared"] > record["shared_limit"]:
        out.append(f"{where}: static shared memory {record['shared']} B > limit {record['shared_limit']} B")
    if record["spill_stores"] or record["spill_loads"]:
        out.append(
            f"{where}: register spills ({record['spill_stores']} B stores, {record['spill_loads']} B loads, "
            f"{record['registers']} registers)"
        )
    if record["capability"] == 90 and record["dot_dtype"] in ("fp16", "bf16") and not record["wgmma"]:
        out.append(f"{where}: {record['dot_dtype']} tl.dot did not produce wgmma on sm_90")
    return out


def run_compile_jobs(jobs: list[tuple[str, int, int]], workers: int) -> list[dict]:
    if workers <= 1:
        return [_compile_one(job) for job in jobs]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def _print_tables(results: list[dict], failures: list[str]) -> None:
    print("== Compiled kernels (triton.compile offline; registers/spills from ptxas -v) ==")
    print(f"{'module':<16} {'spec':<58} {'sm':>3} {'regs':>5} {'spill':>6} {'smem B':>8} {'wgmma':>5} {'s':>6}")
    for r in results:
        if r["error"]:
            print(f"{r['module']:<16} {r['name']:<58} {r['capability']:>3}  ERROR {r['error'][:80]}")
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        print(
            f"{r['module']:<16} {r['name']:<58} {r['capability']:>3} {r['registers']:>5} {spill:>6} "
            f"{r['shared']:>8} {str(r['wgmma']):>5} {r['compile_s']:>6.2f}"
        )
    if failures:
        print()
        print("== FAILURES ==")
        for f in failures:
            print(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupnet.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on compile errors, shared memory, spills, wgmma")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--capabilities", type=int, nargs="+", default=[90, 80], choices=[80, 90])
    parser.add_argument(
        "--sm80", choices=["all", "subset"], default="all",
        help="sm_80: compile every spec, or one per kernel variant with the largest tiles (see compile_jobs)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--modules", nargs="+", help="short module names to report (default: all)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("triton") is None:
        print("groupnet.kernels.report needs triton, which is not installed (pip install triton; Linux only)",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter cannot compile kernels for a GPU")

    start = time.perf_counter()
    jobs = compile_jobs(args.capabilities, args.sm80 == "subset", args.modules)
    results = run_compile_jobs(jobs, args.jobs)
    failures = [f for r in results for f in failures_of(r)]
    if args.json:
        json.dump(
            {
                "results": results,
                "failures": failures,
                "modules": modules_with("compile_specs", args.modules),
                "wall_s": round(time.perf_counter() - start, 2),
            },
            sys.stdout,
        )
        print()
    else:
        _print_tables(results, failures)
        print(f"\n{len(results)} compiles in {time.perf_counter() - start:.1f} s, {len(failures)} failures")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
