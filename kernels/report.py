"""Offline report on groupnet's Triton kernels: compile for sm_80/sm_90 without a GPU, and the resources used.

``python -m groupnet.kernels.report`` prints, for every kernel module of ``groupnet.kernels``:

1. Resources: each ``CompileSpec`` from the module's ``compile_specs()`` (the JIT's specialization of every real
   launch of ``launch_cases()`` x autotune config) is compiled with ``triton.compile`` for ``GPUTarget("cuda", cc,
   32)``; the report gives static shared memory (triton's metadata), registers and spill bytes (``ptxas -v`` on the
   PTX, with the ptxas bundled in the triton wheel), whether the PTX uses ``wgmma``, the global loads (PTX
   ``cp.async`` sizes, TMA, ``ld.global`` widths; TTGIR tile loads left synchronous) and SASS instruction counts
   (the bundled ``cuobjdump -sass``: LDG/LDGSTS by width, UTMALDG, HMMA, HGMMA, FFMA).
2. ``--sass-summary [--markdown]``: per kernel pass x dtype x layout, the operand-load and mma classes, registers
   and an ESTIMATED fraction of the H100 roofline (``estimated_roofline_fraction``; benchmarks/NOTES.md).
Roofline estimates for the shapes of real models are ``python -m groupnet.roofline`` (the kernels know no model).

Must run WITHOUT ``TRITON_INTERPRET`` (the interpreter makes ``@triton.jit`` functions uncompilable).

Protocol for kernel modules (a module in ``kernels/`` takes part by defining these functions):

- ``compile_specs() -> list[CompileSpec]`` (see ``kernels/_common.py``): required for the compile checks; built by
  ``specs_from_launches`` from the module's ``launch_cases() -> list[LaunchCase]`` (its real launches).
- ``roofline_cases(workloads) -> list[dict]`` (optional): one dict per launch of the given shapes, with keys
  ``name`` (str), ``flops`` (float, useful floating-point ops: 2 per multiply-add), ``bytes`` (float, the minimum
  bytes the launch must move to/from HBM: every input read once, every output written once), ``dtype``
  (``"bf16"``, ``"fp16"``, ``"tf32"`` or ``"fp32"``: picks the peak used for the compute floor), and optionally
  ``notes`` (str). Read by ``python -m groupnet.roofline``.

``--check`` exits non-zero when a spec fails to compile, exceeds ``SHARED_MEMORY_LIMIT[cc]``, spills registers,
uses more than ``MAX_REGISTERS_8_WARPS`` registers with 8 warps, loads the operands of a ``tl.dot`` other than by
16-byte asynchronous copies (``cp.async`` of 16 B or TMA; by the TTGIR, no synchronous 2-d tile load inside the
loop and every 2-d tile copy 16 B, narrower copies only for 1-d vectors: ``ttgir_copies``), or (sm_90 only) feeds
16-bit operands to ``tl.dot`` without producing ``wgmma`` -- except the failures ``EXPECTED_FAILURES`` lists
(kernel, pass, layout, check, reason), which are printed apart. ``--subset ci`` is CI's fast subset.
``--json`` prints one JSON object (``{"results": [...], "failures": [...], "expected_failures": [...],
"stale_expected_failures": [...], "modules": [...]}``) instead of tables; ``--list`` lists the specs uncompiled.
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
from typing import NamedTuple

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
                    "sass": sass_counts(dst),
                }
            errors.append(f"{os.path.basename(ptxas)}: {run.stderr.strip()[:300]}")
    raise RuntimeError("no bundled ptxas accepted the PTX: " + " | ".join(errors))


CP_ASYNC_RE = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s+\[[^]]+\],\s*\[[^]]+\],\s*(0x[0-9a-fA-F]+|\d+)"
)
TMA_RE = re.compile(r"\bcp\.async\.bulk\.tensor\b")
LD_GLOBAL_RE = re.compile(r"\bld\.global(?:\.[a-zA-Z0-9:_]+)*?\.(v[248]\.)?([bfsu]\d+)\b")
TTGIR_TILE_LOAD_RE = re.compile(r"\btt\.load\b[^\n]*:\s*tensor<\d+x\d+x!tt\.ptr")
TTGIR_ASYNC_RE = re.compile(r"\bttg\.async_copy_global_to_local\b")
TTGIR_TMA_RE = re.compile(r"\b(?:ttng\.async_tma_copy_global_to_local|tt\.descriptor_load|ttng\.async_tma_gather)\b")


TTGIR_ASYNC_COPY_RE = re.compile(
    r"\bttg\.async_copy_global_to_local\b([^\n]*?):\s*tensor<((?:\d+x)+)!tt\.ptr<([a-z]+)(\d+)>")
TTGIR_CONTIGUITY_RE = re.compile(r"\{contiguity = (\d+) : i32\}")


def _loop_lines(ttgir: str) -> list[bool]:
    """For each TTGIR line, whether it lies inside an ``scf.for`` body (by indentation: the body is indented deeper
    than the ``scf.for`` line and closed by a line at its depth)."""
    inside, loops = [], []
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while loops and line.strip() and indent <= loops[-1]:
            loops.pop()
        inside.append(bool(loops))
        if "scf.for" in line and line.rstrip().endswith("{"):
            loops.append(indent)
    return inside


def ttgir_copies(ttgir: str) -> dict:
    """Operand traffic by the TTGIR: 2-d tile loads left synchronous inside a loop (``tt.load`` of a 2-d tensor in
    an ``scf.for`` body: a dot operand the pipeliner did not turn into an asynchronous copy; a load after the loop,
    such as the epilogue's residual tile, is not an operand), and the asynchronous copies by bytes per copy
    instruction (the op's ``contiguity`` elements, 1 without it, times the element size), 2-d tiles apart from
    1-d vectors (per-channel scale and shift: 32 values over 128 threads are one 4-byte copy each)."""
    loop_sync = 0
    tiles: dict[str, int] = {}
    vectors: dict[str, int] = {}
    for line, in_loop in zip(ttgir.splitlines(), _loop_lines(ttgir)):
        if in_loop and TTGIR_TILE_LOAD_RE.search(line):
            loop_sync += 1
        copy = TTGIR_ASYNC_COPY_RE.search(line)
        if copy:
            attrs, shape, _, bits = copy.groups()
            contiguity = TTGIR_CONTIGUITY_RE.search(attrs)
            width = str((int(contiguity.group(1)) if contiguity else 1) * int(bits) // 8)
            table = tiles if shape.count("x") >= 2 else vectors
            table[width] = table.get(width, 0) + 1
    return {"loop_sync_tile_loads": loop_sync, "tile_copy_bytes": tiles, "vector_copy_bytes": vectors}


def ptx_loads(ptx: str, ttgir: str = "") -> dict:
    """Global loads: in the PTX, asynchronous copies by byte size (``cp.async``), TMA copies
    (``cp.async.bulk.tensor``) and synchronous ``ld.global`` by bytes per instruction; in the TTGIR, 2-d tile loads
    left synchronous (``tt.load`` of a 2-d tensor: not pipelined into shared memory; all of them, and those inside
    a loop), the asynchronous copies, and their widths (``ttgir_copies``)."""
    cp_async: dict[str, int] = {}
    for size in CP_ASYNC_RE.findall(ptx):
        key = str(int(size, 0))
        cp_async[key] = cp_async.get(key, 0) + 1
    ld_global: dict[str, int] = {}
    for vec, ty in LD_GLOBAL_RE.findall(ptx):
        width = (int(vec[1]) if vec else 1) * int(ty[1:]) // 8
        ld_global[str(width)] = ld_global.get(str(width), 0) + 1
    return {
        "cp_async": cp_async,
        "tma": len(TMA_RE.findall(ptx)),
        "ld_global": ld_global,
        "sync_tile_loads": len(TTGIR_TILE_LOAD_RE.findall(ttgir)),
        "async_tile_copies": len(TTGIR_ASYNC_RE.findall(ttgir)) + len(TTGIR_TMA_RE.findall(ttgir)),
        **ttgir_copies(ttgir),
    }


def bundled_tool(name: str) -> str | None:
    """A CUDA binary utility shipped in the triton wheel (``cuobjdump``, ``nvdisasm``), or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


SASS_OPCODES = ("LDG", "LDGSTS", "UTMALDG", "LDS", "LDSM", "STG", "HMMA", "HGMMA", "FFMA", "DFMA", "STL", "LDL")
SASS_OPCODE_RE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)",
                            re.MULTILINE)


SASS_LINE_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;\n]*", re.MULTILINE)
SASS_BRANCH_TARGET_RE = re.compile(r"\bBRA(?:\.[A-Z0-9_]+)*\s+0x([0-9a-f]+)")


def local_memory_ops_in_loops(sass: str) -> int | None:
    """How many local-memory instructions (``STL``/``LDL``: register spills) of ``sass`` lie inside a loop, i.e.
    between a backward branch's target and the branch; None when a branch target cannot be read (``nvdisasm``'s
    labels). A spill stored before the loop and reloaded after it costs one access each per launch; one inside the
    loop costs one per iteration."""
    lines = [(int(addr, 16), opcode, line.group(0)) for line in SASS_LINE_RE.finditer(sass)
             for addr, opcode in [line.groups()]]
    loops = []
    for addr, opcode, text in lines:
        if opcode == "BRA":
            target = SASS_BRANCH_TARGET_RE.search(text)
            if target is None:
                return None
            if int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    return sum(1 for addr, opcode, _ in lines
               if opcode in ("STL", "LDL") and any(start <= addr <= end for start, end in loops))


def sass_counts(cubin_path: str) -> dict | None:
    """Instruction counts of the cubin's SASS (``cuobjdump -sass``, or ``nvdisasm``), by opcode of SASS_OPCODES;
    ``LDG``/``LDGSTS`` also by width (``LDG.128``: 16-byte loads; a bare ``LDG``: 4 bytes; ``.U16`` two); and
    ``LOCAL_IN_LOOPS``, the spill instructions inside loops (:func:`local_memory_ops_in_loops`) when known."""
    tool = bundled_tool("cuobjdump")
    cmd = [tool, "-sass", cubin_path] if tool else None
    if cmd is None and bundled_tool("nvdisasm"):
        cmd = [bundled_tool("nvdisasm"), cubin_path]
    if cmd is None:
        return None
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        return None
    counts: dict[str, int] = {}
    for opcode, modifiers in SASS_OPCODE_RE.findall(run.stdout):
        if opcode not in SASS_OPCODES:
            continue
        counts[opcode] = counts.get(opcode, 0) + 1
        if opcode in ("LDG", "LDGSTS"):
            mods = modifiers.split(".")
            width = next((m for m in mods if m in ("64", "128", "U16", "S16", "U8", "S8")), "32")
            key = f"{opcode}.{width}"
            counts[key] = counts.get(key, 0) + 1
    in_loops = local_memory_ops_in_loops(run.stdout)
    if in_loops is not None:
        counts["LOCAL_IN_LOOPS"] = in_loops
    return counts


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
        "has_dot": spec.has_dot,
        "pass_name": spec.pass_name,
        "variant": spec.variant,
        "layout": spec.layout,
        "cases": len(spec.cases),
        "labels": list(spec.cases),
        "shared_limit": SHARED_MEMORY_LIMIT[capability],
        "error": None,
    }
    start = time.perf_counter()
    try:
        compiled = spec.compile(capability)
        ptx = compiled.asm["ptx"]
        loads = ptx_loads(ptx, compiled.asm.get("ttgir", ""))
        record.update(shared=compiled.metadata.shared, wgmma="wgmma" in ptx, **loads, **ptxas_resources(ptx))
    except Exception as exc:  # reported, and a failure under --check
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    record["compile_s"] = round(time.perf_counter() - start, 3)
    return record


def compile_jobs(
    capabilities: list[int], sm80_subset: bool, only: list[str] | None = None, ci_subset: bool = False
) -> list[tuple[str, int, int]]:
    """(module, spec index, capability) for every spec; with ``sm80_subset``, sm_80 gets one spec per variant
    (kernel, signature, constexprs other than BLOCK*/GROUP*/SPLIT*/NUM_*): the one with the largest
    num_stages x product of BLOCK* sizes, the likeliest to exceed sm_80's smaller shared memory. With ``ci_subset``
    (CI's fast check) every capability gets one build per kernel pass x dtype variant x layout: the specialization
    that most launches share (not an outlier such as the stem) with its largest tiles."""
    jobs = []
    for module in modules_with("compile_specs", only):
        specs = importlib.import_module(module).compile_specs()
        for capability in capabilities:
            indices = range(len(specs))
            if ci_subset or (capability == 80 and sm80_subset):
                chosen: dict[tuple, int] = {}
                for i, spec in enumerate(specs):
                    if ci_subset:
                        key = (getattr(spec.fn, "__name__", ""), spec.pass_name, spec.variant, spec.layout)
                        rank = (len(spec.cases), _smem_rank(spec))
                    else:
                        key, rank = _variant_key(spec), (0, _smem_rank(spec))
                    best = chosen.get(key)
                    if best is None or rank > ((len(specs[best].cases) if ci_subset else 0), _smem_rank(specs[best])):
                        chosen[key] = i
                indices = sorted(chosen.values())
            # a spec that names its targets (the TMA GEMM: sm_90 only) is not built for the others
            jobs.extend((module, i, capability) for i in indices
                        if capability in getattr(specs[i], "capabilities", (capability,)))
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


MAX_REGISTERS_8_WARPS = 232
"""Register ceiling of an 8-warp tile (255 is ptxas's hard limit): headroom for the compiler's next version."""


class ExpectedFailure(NamedTuple):
    """A check that real-launch builds of a kernel fail because of the kernel itself, known and tracked.

    Matches a failure by module, pass, layout (``"*"``: any), check (``"async_copy"``, ``"registers"``, ``"spills"``,
    ``"wgmma"``, ``"shared"``) and optionally dtype variant, capability and ``where``, a text every launch the build
    compiles has in its label (``" 3->"``: the stem) and tile sizes. Fixing the kernel should remove the row: rows that match no
    failure are listed as stale by the report."""

    module: str
    pass_name: str
    layout: str
    check: str
    reason: str
    variant: str = "*"
    capability: int = 0  # 0: any
    where: str = "*"
    tiles: str = "*"  # the build's BLOCK sizes as its name gives them ("128x16x16"); "*": any
    narrow_only: bool = False  # only builds that copy every 2-d tile asynchronously, some 16 B (narrow, not gathers)
    small_tiles: bool = False  # only builds with an operand tile under 16 B per thread (operand_tile_bytes_per_thread)
    spills_outside_loops: bool = False  # only builds whose spill instructions all lie outside loops (from the SASS)


_GEMM_100_CLASSES = (
    "the classifier's 100 classes per branch: the operand whose contiguous axis is the class axis (dY in dX, dY^T "
    "in dW) starts each branch's block 100 elements after the last, inside rows of K*100, and 100 is not a "
    "multiple of 16, so the JIT cannot mark the group stride divisible. In 16-bit the 200-byte group offset puts "
    "every other branch at an 8-byte boundary, where 16-byte copies are impossible; in fp32 (400 bytes) the blocks "
    "are aligned but no specialization shows it. On the model path these two backward GEMMs are a few MFLOP of a "
    "multi-TFLOP step (estimate); with a class count divisible by 16 all three passes copy 16 B "
    "(tests/kernels/test_grouped_gemm_ptx.py)")
_TF32_K_MAJOR = ("tf32 wgmma reads both operands K-major from shared memory (the PTX ISA allows the transposed "
                 "layouts for 16-bit types only); this pass's operand is contiguous along M/N (channels), so Triton "
                 "copies it 4 bytes at a time. sm_80's mma.sync path copies 16 B. The model path takes these builds "
                 "when training in fp32 on sm_90 with TF32 (torch's default conv precision); --amp bf16/fp16 avoids "
                 "them")
_STEM = ("the 3-channel stem: its channel rows are 6 (16-bit) or 12 (fp32) bytes, which no 16-byte copy can read; "
         "inherent to 3-channel images (one conv of the network, under 1% of a WRN-28-10 step's FLOPs, estimate)")
_12_CHANNELS = ("12 channels per branch (ResNet-56 at K=2) in 16-bit: 24-byte channel rows, so 8-byte copies at best; "
                "inherent to the channel count (fp32's 48-byte rows copy 16 B)")
_SMALL_TILES = ("an operand tile with fewer than 16 bytes per thread (depth x the narrower of rows and columns x the "
                "element size, over the block's threads): Triton spreads each tile over every thread, so its copies "
                "cannot be 16 bytes wide. The 16-wide channel tiles (128x16x16 on 4 warps: a 16x16 weight tile is 2 "
                "elements per thread, 4 B in 16-bit, 8 B in fp32) are the only ones that divide 80/112 channels and "
                "fit 8-16-channel layers without padding; the 256-row tiles' 16-deep reduction (256x64x16 on 8 warps: "
                "4 elements per thread, 8 B in 16-bit) keeps fp32 within the registers. The other operand's tile stays "
                "16 B. Not fixed: deeper or narrower-thread tiles exist (128x16x64 on 4 warps copies 16 B throughout: "
                "bf16, sm_90, 90 registers, 72 KB shared, measured) but would pad the narrow layers; which costs less "
                "needs a GPU")


def operand_tile_bytes_per_thread(record: dict) -> float | None:
    """The smaller operand tile of a conv build in bytes per thread: depth x min(rows, columns) x element size over
    32 x warps, from the build's name (``..._RxCxD_wW_...``: rows, columns, reduction depth) and dtype variant; None
    for a name without three block sizes."""
    match = re.search(r"_(\d+)x(\d+)x(\d+)_w(\d+)_s\d+$", record["name"])
    if match is None:
        return None
    rows, cols, depth, warps = (int(v) for v in match.groups())
    element = 4 if record.get("variant", "").startswith("fp32") else 2
    return depth * min(rows, cols) * element / (32 * warps)


_SPILLS_OUTSIDE_LOOPS = ("ptxas keeps a few bytes (4-20 B per thread, at 96 or 128 registers) in local memory, "
                         "stored before the main loop and reloaded after it: no spill instruction lies inside a "
                         "loop (read from the SASS), so it costs one local store and load per thread per launch, "
                         "not per iteration. ptxas's own choice, not the register file's limit: the same PTX "
                         "compiled with -maxrregcount=255 spills the same (fwd fp16 64x64x32 / 4 warps on sm_80: "
                         "96 registers, 4 B, STL before the loop and LDL.LU after it)")

EXPECTED_FAILURES: list[ExpectedFailure] = [
    # Real-launch builds that fail a check because of the kernel or its inputs. Rows marked inherent cannot pass in
    # Triton 3.8 for that layout or shape; the others are named as not fixed. Fixing a kernel means deleting its
    # rows here; the report names rows that went stale.
    ExpectedFailure("grouped_gemm", "backward_input", "-", "async_copy", _GEMM_100_CLASSES),
    ExpectedFailure("grouped_gemm", "backward_weight", "-", "async_copy", _GEMM_100_CLASSES),
    ExpectedFailure("grouped_conv2d", "bwd_input", "channels_last", "async_copy", _TF32_K_MAJOR, variant="fp32_tf32",
                    capability=90),
    ExpectedFailure("grouped_conv2d", "bwd_weight", "channels_last", "async_copy", _TF32_K_MAJOR, variant="fp32_tf32",
                    capability=90),
    ExpectedFailure("grouped_conv2d", "*", "*", "async_copy", _STEM, where=" 3->"),
    ExpectedFailure("grouped_conv2d", "*", "channels_last", "async_copy", _12_CHANNELS, where="K2 12->"),
    ExpectedFailure("grouped_conv2d_fused", "*", "channels_last", "async_copy", _12_CHANNELS, where="K2 12->"),
    ExpectedFailure("grouped_conv2d", "*", "*", "spills", _SPILLS_OUTSIDE_LOOPS, spills_outside_loops=True),
    ExpectedFailure("grouped_conv2d_fused", "*", "*", "spills", _SPILLS_OUTSIDE_LOOPS, spills_outside_loops=True),
    ExpectedFailure("grouped_conv2d", "*", "channels_last", "async_copy", _SMALL_TILES, narrow_only=True,
                    small_tiles=True),
    ExpectedFailure("grouped_conv2d_fused", "*", "channels_last", "async_copy", _SMALL_TILES, narrow_only=True,
                    small_tiles=True),
]


def _check_failures(record: dict) -> list[tuple[str, str]]:
    """(check, message) for each check a compiled spec fails."""
    where = f"{record['module']}:{record['name']} sm_{record['capability']}"
    if record["error"]:
        return [("compile", f"{where}: compile error: {record['error']}")]
    out = []
    if record["shared"] > record["shared_limit"]:
        out.append(("shared", f"{where}: static shared memory {record['shared']} B > limit {record['shared_limit']} B"))
    if record["spill_stores"] or record["spill_loads"]:
        out.append(("spills",
            f"{where}: register spills ({record['spill_stores']} B stores, {record['spill_loads']} B loads, "
            f"{record['registers']} registers)"
        ))  # fmt: skip
    if record["num_warps"] >= 8 and record["registers"] > MAX_REGISTERS_8_WARPS:
        out.append(("registers", f"{where}: {record['registers']} registers with {record['num_warps']} warps "
                                 f"(> {MAX_REGISTERS_8_WARPS})"))
    if record.get("has_dot"):
        cp_async = record.get("cp_async", {})
        if "tile_copy_bytes" in record:
            # the operand tiles by the TTGIR: no synchronous tile load in the loop, every 2-d copy 16 bytes; a
            # narrower PTX copy must be one of the 1-d vector copies' widths (per-channel scale and shift)
            sync = record["loop_sync_tile_loads"]
            narrow = {size: n for size, n in record["tile_copy_bytes"].items() if size != "16"}
            narrow.update({size: n for size, n in cp_async.items()
                           if size != "16" and size not in record["vector_copy_bytes"]})
        else:  # a record without the TTGIR widths (an older --json): every 2-d tile load and PTX copy
            sync = record.get("sync_tile_loads")
            narrow = {size: n for size, n in cp_async.items() if size != "16"}
        if sync or (not record.get("tma") and not cp_async.get("16")) or narrow:
            out.append(("async_copy",
                f"{where}: operand loads are not all 16-byte asynchronous copies ({sync} synchronous 2-d tile loads "
                f"in the loop; 2-d tile copies by bytes {record.get('tile_copy_bytes')}, 1-d vector copies "
                f"{record.get('vector_copy_bytes')}; PTX cp.async by bytes {cp_async}, TMA {record.get('tma', 0)}, "
                f"ld.global by bytes {record.get('ld_global', {})})"
            ))  # fmt: skip
    if record["capability"] == 90 and record["dot_dtype"] in ("fp16", "bf16") and not record["wgmma"]:
        out.append(("wgmma", f"{where}: {record['dot_dtype']} tl.dot did not produce wgmma on sm_90"))
    return out


def _covers(row: ExpectedFailure, record: dict) -> bool:
    """``row`` names ``record``'s build: module, pass, layout, variant, arch, launches, tiles and the build facts the
    row asks for (small tiles, spills outside loops); which check and which load classes it excuses aside."""
    return (
        row.module == record["module"]
        and row.pass_name in ("*", record.get("pass_name"))
        and row.layout in ("*", record.get("layout"))
        and row.variant in ("*", record.get("variant"))
        and row.capability in (0, record["capability"])
        and (row.where == "*" or all(row.where in label for label in record.get("labels", ())))
        and (row.tiles == "*" or f"_{row.tiles}_w" in record["name"])
        and (not row.small_tiles or (operand_tile_bytes_per_thread(record) or 16) < 16)
        and (not row.spills_outside_loops or (record.get("sass") or {}).get("LOCAL_IN_LOOPS") == 0)
    )


def _matches(row: ExpectedFailure, record: dict, check: str) -> bool:
    return (
        _covers(row, record)
        and (not row.narrow_only or (record.get("loop_sync_tile_loads", 1) == 0
                                     and "16" in record.get("tile_copy_bytes", {})))
        and row.check == check
    )


def expected_failure_of(record: dict, check: str, table: list[ExpectedFailure] | None = None) -> ExpectedFailure | None:
    """The row of ``table`` (default EXPECTED_FAILURES) that excuses ``check`` failing for ``record``, if any."""
    if check == "compile":
        return None  # a build that does not compile is never expected
    return next((row for row in (EXPECTED_FAILURES if table is None else table) if _matches(row, record, check)),
                None)


def failures_of(record: dict, table: list[ExpectedFailure] | None = None) -> list[str]:
    """Why a compiled spec fails the checks (empty when it passes), leaving out the expected failures."""
    return [msg for check, msg in _check_failures(record) if expected_failure_of(record, check, table) is None]


def expected_failures_of(record: dict, table: list[ExpectedFailure] | None = None) -> list[str]:
    """The failures of ``record`` that rows of the expected-failure table excuse, each with the row's reason."""
    out = []
    for check, msg in _check_failures(record):
        row = expected_failure_of(record, check, table)
        if row is not None:
            out.append(f"{msg} [expected: {row.reason}]")
    return out


def stale_expected_failures(results: list[dict], table: list[ExpectedFailure] | None = None) -> list[ExpectedFailure]:
    """Rows that excuse no failure among ``results`` (the kernel was fixed, or the row no longer matches): remove
    them. Only rows whose module, pass and capability were compiled at all are judged."""
    rows = EXPECTED_FAILURES if table is None else table
    used = {row for r in results for check, _ in _check_failures(r)
            if (row := expected_failure_of(r, check, rows)) is not None}
    compiled = [r for r in results if not r["error"]]
    return [row for row in rows if row not in used and any(_covers(row, r) for r in compiled)]


def run_compile_jobs(jobs: list[tuple[str, int, int]], workers: int) -> list[dict]:
    """Compile ``jobs`` (in ``workers`` spawned processes when more than one). Raises when a worker compiled another
    spec than this process's list names at that index: a kernel module changed while the check ran."""
    if workers <= 1:
        results = [_compile_one(job) for job in jobs]
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    for (module, index, capability), record in zip(jobs, results):
        expected = importlib.import_module(module).compile_specs()[index].name
        if record["name"] != expected:
            raise RuntimeError(
                f"spec {index} of {module} (sm_{capability}) is {expected} here, but the worker compiled "
                f"{record['name']}: the kernel modules changed while the check ran; rerun it without editing them")
    return results


TILES_128_WITH_VECTORS = "LDGSTS.128 tiles + narrow 1-d vectors"
"""Load class of a build whose 2-d operand tiles are 16-byte copies and whose narrower copies are all 1-d vectors
(the prologue's per-channel scale and shift)."""


def _load_class(record: dict) -> str:
    """How a build loads its operands, from the SASS (PTX when no SASS): TMA, 16-byte async copies, narrower async
    copies, 16-byte synchronous loads, or narrow (<= 4-byte) gathers."""
    sass = record.get("sass") or {}
    sync = " + synchronous LDG tiles" if record.get("loop_sync_tile_loads", record.get("sync_tile_loads")) else ""
    if sass:
        if sass.get("UTMALDG"):
            return "UTMALDG (TMA)" + sync
        ldgsts = sorted(k for k in sass if k.startswith("LDGSTS."))
        if ldgsts == ["LDGSTS.128"]:
            return "LDGSTS.128" + sync
        vector_bits = {str(8 * int(b)) for b in record.get("vector_copy_bytes", {})}
        if (set(record.get("tile_copy_bytes") or {"-"}) == {"16"} and "LDGSTS.128" in ldgsts
                and all(k.split(".")[1] in vector_bits for k in ldgsts if k != "LDGSTS.128")):
            return TILES_128_WITH_VECTORS + sync
        if ldgsts:
            return " + ".join(ldgsts) + (" (narrow async copies)" if sync == "" else sync)
        return "LDG.128 (synchronous)" if sass.get("LDG.128") else "LDG <= 8 B (gathers)"
    if record.get("tma"):
        return "cp.async.bulk.tensor (TMA)"
    cp = record.get("cp_async", {})
    if cp:
        return "cp.async 16 B" if set(cp) == {"16"} else f"cp.async sizes {sorted(cp)}"
    return "ld.global"


def _mma_class(record: dict) -> str:
    sass = record.get("sass") or {}
    if sass:
        for op in ("HGMMA", "HMMA", "DFMA", "FFMA"):
            if sass.get(op):
                return op
        return "-"
    return "wgmma" if record.get("wgmma") else "mma/fma"


# Ceilings of the ESTIMATE model (fractions of the H100 roofline one build can reach). Judgement, not measurement:
# asynchronous wgmma with TMA/cp.async pipelines reaches ~75% of dense peak in tuned Triton GEMMs; mma.sync (HMMA)
# on Hopper tops out near 2/3 of the wgmma peak; synchronous or narrow loads stall the tensor cores.
MMA_CEILING = {"HGMMA": 0.75, "wgmma": 0.75, "HMMA": 0.5, "FFMA": 0.6, "DFMA": 0.6, "-": 0.8, "mma/fma": 0.5}
LOAD_CEILING = {"UTMALDG (TMA)": 1.0, "cp.async.bulk.tensor (TMA)": 1.0, "LDGSTS.128": 1.0, "cp.async 16 B": 1.0,
                TILES_128_WITH_VECTORS: 1.0, "LDG.128 (synchronous)": 0.6}
NARROW_LOAD_CEILING = 0.6  # async copies narrower than 16 B
GATHER_CEILING = 0.25  # <= 8-byte synchronous loads of the operands
STREAM_CEILING = {"LDG.128": 0.8, "narrow": 0.5}  # kernels without a dot (memory-bound), by load width


def estimated_roofline_fraction(record: dict) -> float:
    """ESTIMATE of the fraction of the H100 roofline (max of compute and memory floors) a build can reach: the
    product of a ceiling for its mma instructions and one for its operand loads (MMA_CEILING, LOAD_CEILING;
    GATHER_CEILING when any operand tile is loaded synchronously), STREAM_CEILING for kernels without a dot, halved
    for an 8-warp tile above MAX_REGISTERS_8_WARPS registers or with spills. A model for comparing builds, not a
    prediction of a timing."""
    load = _load_class(record)
    if not record.get("has_dot"):  # a streaming kernel: memory-bound, coalesced narrow loads still stream
        fraction = STREAM_CEILING["LDG.128"] if "128" in load else STREAM_CEILING["narrow"]
    elif "synchronous LDG" in load or "gathers" in load:
        fraction = MMA_CEILING.get(_mma_class(record), 0.5) * GATHER_CEILING
    else:
        fraction = MMA_CEILING.get(_mma_class(record), 0.5) * LOAD_CEILING.get(load, NARROW_LOAD_CEILING)
    if record.get("spill_stores") or (record["num_warps"] >= 8 and record["registers"] > MAX_REGISTERS_8_WARPS):
        fraction /= 2
    return fraction


def sass_summary(results: list[dict], capability: int = 90) -> list[dict]:
    """One row per (module, pass, dtype variant, layout) over the builds for ``capability``: builds, register range,
    operand-load and mma classes (most frequent first, with counts), and the mean estimated roofline fraction."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["capability"] == capability and not r["error"]:
            key = (r["module"], r.get("pass_name", ""), r.get("variant", ""), r.get("layout", ""))
            groups.setdefault(key, []).append(r)
    rows = []
    for (module, pass_name, variant, layout), group in sorted(groups.items()):

        def tally(classify) -> str:
            counts: dict[str, int] = {}
            for r in group:
                counts[classify(r)] = counts.get(classify(r), 0) + 1
            return "; ".join(f"{k} {v}/{len(group)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))

        regs = [r["registers"] for r in group]
        rows.append({
            "module": module, "pass": pass_name, "variant": variant, "layout": layout, "builds": len(group),
            "registers": f"{min(regs)}-{max(regs)}" if min(regs) != max(regs) else str(regs[0]),
            "loads": tally(_load_class), "mma": tally(_mma_class),
            "est_fraction": sum(estimated_roofline_fraction(r) for r in group) / len(group),
        })  # fmt: skip
    return rows


def print_sass_summary(rows: list[dict], markdown: bool, capability: int = 90) -> None:
    header = ["kernel", "pass", "dtype", "layout", "builds", "registers", "operand loads (SASS)", "mma (SASS)",
              "est. % of H100 roofline"]
    cells = [[r["module"], r["pass"], r["variant"], r["layout"], str(r["builds"]), r["registers"], r["loads"],
              r["mma"], f"{100 * r['est_fraction']:.0f}%"] for r in rows]
    if markdown:
        print(f"Builds for sm_{capability} of the real launches (python -m groupnet.kernels.report --sass-summary "
              "--markdown); percentages are ESTIMATES (kernels/report.py: estimated_roofline_fraction), not timings.")
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
        return
    print(f"== SASS summary, sm_{capability} (estimated % of H100 roofline: ESTIMATES) ==")
    for c in cells:
        print("  ".join(c))


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


def _shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 3/8, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupnet.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on compile errors, shared memory, spills, wgmma")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--capabilities", type=int, nargs="+", choices=[80, 90],
                        help="default: 90 80 (90 alone with --sass-summary)")
    parser.add_argument(
        "--sm80", choices=["all", "subset"], default="all",
        help="sm_80: compile every spec, or one per kernel variant with the largest tiles (see compile_jobs)",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--modules", nargs="+", help="short module names to report (default: all)")
    parser.add_argument(
        "--subset", choices=["all", "ci"], default="all",
        help="all: every spec; ci (CI's fast check, and quick iteration): one build per kernel pass x dtype x layout "
             "and arch, the specialization most launches share with its largest tiles (see compile_jobs)",
    )  # fmt: skip
    parser.add_argument("--shard", metavar="K/N", type=_shard,
                        help="build only every N-th job starting at the K-th (1 <= K <= N): the full check split "
                             "across processes or machines, each with its own exit status")
    parser.add_argument("--list", action="store_true", help="list the specs (and the launches each covers); no compile")
    parser.add_argument("--sass-summary", action="store_true",
                        help="print per kernel pass x dtype x layout the SASS load/mma classes, registers and the "
                             "estimated fraction of the H100 roofline (sm_90 builds)")
    parser.add_argument("--markdown", action="store_true", help="with --sass-summary: a markdown table")
    parser.add_argument("--from-json", metavar="FILE",
                        help="with --sass-summary: summarise the results of an earlier --json run instead of compiling")
    args = parser.parse_args(argv)
    if args.from_json:
        if not args.sass_summary:
            parser.error("--from-json goes with --sass-summary")
        with open(args.from_json) as f:
            print_sass_summary(sass_summary(json.load(f)["results"]), args.markdown)
        return 0
    if importlib.util.find_spec("triton") is None:
        print("groupnet.kernels.report needs triton, which is not installed (pip install triton; Linux only)",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter cannot compile kernels for a GPU")

    start = time.perf_counter()
    if args.capabilities is None:
        args.capabilities = [90] if args.sass_summary else [90, 80]
    if args.sass_summary and 90 not in args.capabilities:
        parser.error("--sass-summary summarises the sm_90 builds: keep 90 in --capabilities")
    jobs = compile_jobs(args.capabilities, args.sm80 == "subset", args.modules, ci_subset=args.subset == "ci")
    if args.shard:
        k, n = args.shard
        jobs = jobs[k - 1::n]
    if args.list:
        return _list_jobs(jobs, args.json)
    results = run_compile_jobs(jobs, args.jobs)
    failures = [f for r in results for f in failures_of(r)]
    expected = [f for r in results for f in expected_failures_of(r)]
    stale = [row._asdict() for row in stale_expected_failures(results)]
    if args.json:
        json.dump(
            {
                "results": results,
                "failures": failures,
                "expected_failures": expected,
                "stale_expected_failures": stale,
                "modules": modules_with("compile_specs", args.modules),
                "wall_s": round(time.perf_counter() - start, 2),
            },
            sys.stdout,
        )
        print()
    elif args.sass_summary:
        print_sass_summary(sass_summary(results), args.markdown)
    else:
        _print_tables(results, failures)
        if expected:
            print(f"\n== {len(expected)} EXPECTED FAILURES (EXPECTED_FAILURES in kernels/report.py) ==")
            for f in expected:
                print(f)
        for row in stale:
            print(f"STALE expected-failure row (nothing fails it any more; remove it): {row}")
        print(f"\n{len(results)} compiles in {time.perf_counter() - start:.1f} s, {len(failures)} failures, "
              f"{len(expected)} expected failures")
    return 1 if args.check and failures else 0


def _list_jobs(jobs: list[tuple[str, int, int]], as_json: bool) -> int:
    """Print the specs of ``jobs`` with the launches each covers (structure only; nothing is compiled)."""
    rows = []
    for module, index, capability in jobs:
        spec = importlib.import_module(module).compile_specs()[index]
        rows.append({"module": module.rsplit(".", 1)[-1], "name": spec.name, "capability": capability,
                     "pass_name": spec.pass_name, "variant": spec.variant, "layout": spec.layout,
                     "num_warps": spec.num_warps, "num_stages": spec.num_stages, "cases": list(spec.cases),
                     "constexprs": {k: str(v) for k, v in spec.constexprs.items()},
                     "signature": spec.signature, "attrs": [list(map(list, a)) for a in spec.attrs().items()]})
    if as_json:
        json.dump({"specs": rows}, sys.stdout)
        print()
    else:
        for r in rows:
            print(f"{r['module']:<16} sm_{r['capability']} {r['name']}  ({len(r['cases'])} launches)")
        print(f"{len(rows)} compiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
