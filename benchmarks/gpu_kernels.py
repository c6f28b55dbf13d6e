"""Check and time groupnet's Triton kernels on a CUDA GPU against cuBLAS/cuDNN, for split WRN-28-10 shapes.

    python benchmarks/gpu_kernels.py [--dtype bf16 fp32] [--ops linear conv] [--csv out.csv]

For each shape (K = 2, 4; batch 128; widths from SplitNet's rule: widen 10 -> 7 at K=2, 5 at K=4):

1. correctness: the Triton op's output and gradients against torch's (cuBLAS ``bmm`` for the grouped linear,
   cuDNN ``F.conv2d(groups=K)`` for the grouped conv), computed from the same inputs;
2. timing (median of CUDA-graph replays, ``triton.testing.do_bench_cudagraph``, ms; ``cudnn.benchmark`` on),
   forward and forward+backward, of: the Triton op, torch's
   fused grouped op (``bmm`` / grouped ``F.conv2d``), and a per-branch loop of ``F.linear`` / ``F.conv2d``.

The conv rows appear when ``kernels/grouped_conv2d.py`` exists. Without a CUDA GPU the script exits with status 2.
``--smoke`` runs only the correctness part on tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (to test the
script itself; no timings).

The whole comparison, one command (GPU only), markdown ready to paste into ``benchmarks/RESULTS-gpu.md``::

    python benchmarks/gpu_kernels.py --table [--out table.md]

Per pass (forward, input grad, weight grad), bf16 and fp32-with-TF32, every grouped conv of the split WRN-28-10
(K = 2, 4) and ResNet-56 (K = 2, 4) (``kernels/_launch_shapes.py``), channels_last, batch 128: the Triton grouped
kernel, cuDNN's grouped conv (``groups=K``), a per-branch loop of cuDNN convs, and the dense cuDNN conv of equal
FLOPs (channels x sqrt(K)); the same for the classifier (cuBLAS ``bmm``, a loop of ``F.linear``, a dense linear).
Timings: ``cudnn.benchmark`` on (cuDNN picks its fastest algorithm, as training would), each op captured in a CUDA
graph (``triton.testing.do_bench_cudagraph``) so small ops do not time Python dispatch; median. Each row gives the
%-of-roofline, ``max(flops / peak, bytes / HBM bandwidth) / time``, with the dense datasheet peaks of the detected
device (``DEVICE_PEAKS``; printed above the table).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WRN_SPLIT_WIDEN = {2: 7, 4: 5}  # SplitNet: WRN-28-10 split into K branches
BATCH = 128
CLASSES = 100
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Max |triton - torch| allowed, relative to max |torch|: both sides round to the same dtype, in different orders.
# fp32 with tf32 (cuDNN's default for convs; matmuls only with allow_tf32) keeps 10 mantissa bits.
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
TF32_REL_TOL = 5e-3


@dataclass(frozen=True)
class LinearCase:
    k: int
    m: int
    in_f: int
    out_f: int

    @property
    def name(self) -> str:
        return f"linear K={self.k} M={self.m} in={self.in_f} out={self.out_f}"


@dataclass(frozen=True)
class ConvCase:
    k: int
    n: int
    cin: int
    cout: int
    kernel: int
    stride: int
    hw: int

    @property
    def name(self) -> str:
        return f"conv K={self.k} N={self.n} {self.cin}->{self.cout} k{self.kernel}s{self.stride} {self.hw}px"


def linear_cases(batch: int) -> list[LinearCase]:
    return [LinearCase(k, batch, 64 * widen, CLASSES) for k, widen in WRN_SPLIT_WIDEN.items()]


def conv_cases(batch: int) -> list[ConvCase]:
    cases = []
    for k, widen in WRN_SPLIT_WIDEN.items():
        c1, c2, c3 = 16 * widen, 32 * widen, 64 * widen
        cases += [
            ConvCase(k, batch, c1, c1, 3, 1, 32),
            ConvCase(k, batch, c1, c2, 3, 2, 32),
            ConvCase(k, batch, c1, c2, 1, 2, 32),
            ConvCase(k, batch, c2, c2, 3, 1, 16),
            ConvCase(k, batch, c3, c3, 3, 1, 8),
        ]
    return cases


def smoke_cases() -> tuple[list[LinearCase], list[ConvCase]]:
    linear = [LinearCase(2, 5, 12, 7), LinearCase(3, 4, 9, 5)]
    return linear, [ConvCase(2, 1, 4, 6, 3, 2, 5), ConvCase(2, 1, 3, 3, 1, 1, 4)]


def conv_available() -> bool:
    return importlib.util.find_spec("groupnet.kernels.grouped_conv2d") is not None


# --- the three implementations of each op -------------------------------------------------------------------------


def linear_impls(case: LinearCase):
    from groupnet.kernels.grouped_gemm import grouped_linear

    k, in_f = case.k, case.in_f

    def torch_bmm(x, w, b):
        xs = x.view(-1, k, in_f).transpose(0, 1)
        return torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], -1)

    def loop(x, w, b):
        return torch.cat([F.linear(x[:, i * in_f : (i + 1) * in_f], w[i], b[i]) for i in range(k)], dim=1)

    return {"triton": grouped_linear, "torch_grouped": torch_bmm, "loop": loop}


def linear_inputs(case: LinearCase, dtype: torch.dtype, device: str):
    x = torch.randn(case.m, case.k * case.in_f, device=device, dtype=dtype)
    w = torch.randn(case.k, case.out_f, case.in_f, device=device, dtype=dtype) / case.in_f**0.5
    b = torch.randn(case.k, case.out_f, device=device, dtype=dtype)
    return [x, w, b]


def conv_impls(case: ConvCase):
    from groupnet.kernels.grouped_conv2d import grouped_conv2d

    k, pad = case.k, case.kernel // 2

    def triton_conv(x, w, b):
        return grouped_conv2d(x, w, b, branches=k, stride=case.stride, padding=pad)

    def torch_grouped(x, w, b):
        return F.conv2d(x, w, b, stride=case.stride, padding=pad, groups=k)

    def loop(x, w, b):
        xs, ws, bs = x.chunk(k, dim=1), w.chunk(k, dim=0), b.chunk(k)
        return torch.cat([F.conv2d(xi, wi, bi, stride=case.stride, padding=pad) for xi, wi, bi in zip(xs, ws, bs)], 1)

    return {"triton": triton_conv, "torch_grouped": torch_grouped, "loop": loop}


def conv_inputs(case: ConvCase, dtype: torch.dtype, device: str):
    x = torch.randn(case.n, case.k * case.cin, case.hw, case.hw, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    fan_in = case.cin * case.kernel**2
    w = torch.randn(case.k * case.cout, case.cin, case.kernel, case.kernel, device=device, dtype=dtype) / fan_in**0.5
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(case.k * case.cout, device=device, dtype=dtype)
    return [x, w, b]


# --- correctness and timing ---------------------------------------------------------------------------------------


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp_min(1e-30)
    return float((got.double() - want.double()).abs().max() / scale)


def check(impls, inputs) -> dict[str, float]:
    """Relative max error of the Triton op's output and gradients against torch's grouped op."""
    grad_seed = None
    results = {}
    for name in ("triton", "torch_grouped"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = impls[name](*leaves)
        if grad_seed is None:
            grad_seed = torch.randn_like(y)
        y.backward(grad_seed)
        results[name] = [y.detach()] + [t.grad for t in leaves]
    labels = ("output", "grad_input", "grad_weight", "grad_bias")
    return {label: max_rel_error(g, w) for label, g, w in zip(labels, results["triton"], results["torch_grouped"])}


def time_ms(impls, inputs) -> dict[str, float]:
    """Median ms of forward and forward+backward of each implementation, replayed from CUDA graphs (no Python
    dispatch in the timing); each runs once outside the capture first (Triton autotuning, cuDNN benchmark)."""
    from triton.testing import do_bench_cudagraph

    def do_bench(fn, warmup=None, rep=100, grad_to_none=None, quantiles=None):
        fn()
        torch.cuda.synchronize()
        return [do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median")]

    out = {}
    for name, fn in impls.items():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grad = torch.randn_like(fn(*leaves))

        def forward():
            with torch.no_grad():
                fn(*leaves)

        def forward_backward():
            fn(*leaves).backward(grad)

        out[f"{name}_fwd_ms"] = do_bench(forward, warmup=25, rep=100, quantiles=[0.5])
        out[f"{name}_fwdbwd_ms"] = do_bench(forward_backward, warmup=25, rep=100, grad_to_none=leaves, quantiles=[0.5])
    return {k: float(v[0] if isinstance(v, (list, tuple)) else v) for k, v in out.items()}


def run(ops: list[str], dtypes: list[str], device: str, smoke: bool, batch: int) -> tuple[list[dict], list[str]]:
    rows, failures = [], []
    lin, conv = smoke_cases() if smoke else (linear_cases(batch), conv_cases(batch))
    plan = []
    if "linear" in ops:
        plan += [(c, linear_impls, linear_inputs, torch.backends.cuda.matmul.allow_tf32) for c in lin]
    if "conv" in ops:
        if conv_available():
            plan += [(c, conv_impls, conv_inputs, torch.backends.cudnn.allow_tf32) for c in conv]
        else:
            print("kernels/grouped_conv2d.py not found: conv rows skipped", file=sys.stderr)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for case, make_impls, make_inputs, tf32 in plan:
            torch.manual_seed(0)
            impls, inputs = make_impls(case), make_inputs(case, dtype, device)
            errors = check(impls, inputs)
            row = {"case": case.name, "dtype": dtype_name, **{f"err_{k}": v for k, v in errors.items()}}
            tol = TF32_REL_TOL if dtype == torch.float32 and tf32 and device == "cuda" else REL_TOL[dtype]
            bad = {k: v for k, v in errors.items() if v > tol}
            if bad:
                failures.append(f"{case.name} {dtype_name}: relative error above {tol}: {bad}")
            if not smoke:
                row.update(time_ms(impls, inputs))
            rows.append(row)
            print(_format(row), flush=True)
    return rows, failures


def _format(row: dict) -> str:
    errs = " ".join(f"{k[4:]}={v:.1e}" for k, v in row.items() if k.startswith("err_"))
    times = " ".join(f"{k[:-3]}={v:.4f}" for k, v in row.items() if k.endswith("_ms"))
    return f"{row['case']:<44} {row['dtype']:<5} {errs}  {times}"


# --- the one-command comparison table -------------------------------------------------------------------------------

DEVICE_PEAKS = {
    # Dense datasheet peaks (no sparsity): FLOP/s by dot dtype, HBM bytes/s. The H200 has the H100 SXM's compute.
    "H100": {"bf16": 989e12, "tf32": 494e12, "hbm": 3.35e12},
    "H200": {"bf16": 989e12, "tf32": 494e12, "hbm": 4.8e12},
}
TABLE_DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32}
PASSES = ("forward", "input grad", "weight grad")
IMPLS = ("triton grouped", "cuDNN grouped", "cuDNN per-branch loop", "cuDNN dense, equal FLOPs")


def device_peaks(name: str) -> tuple[str, dict[str, float]] | None:
    """(key, peaks) of DEVICE_PEAKS for a CUDA device name ("NVIDIA H100 80GB HBM3" -> H100), None if unknown."""
    for key in sorted(DEVICE_PEAKS, key=len, reverse=True):
        if key in name.upper():
            return key, DEVICE_PEAKS[key]
    return None


@dataclass(frozen=True)
class PassCost:
    """Useful FLOPs (2 per multiply-add) and minimum HBM bytes (inputs read once, outputs written once) of a pass."""

    flops: float
    bytes: float


def conv_costs(
    k: int, n: int, cin: int, cout: int, kernel: int, stride: int, hw: int, elem: int
) -> dict[str, PassCost]:
    """PassCost of each pass of a grouped conv (K groups of cin -> cout; padding kernel // 2)."""
    out = (hw + 2 * (kernel // 2) - kernel) // stride + 1
    x, y, w = n * k * cin * hw * hw, n * k * cout * out * out, k * cout * cin * kernel * kernel
    flops = 2.0 * n * out * out * k * cout * cin * kernel * kernel
    return {"forward": PassCost(flops, (x + w + y) * elem), "input grad": PassCost(flops, (y + w + x) * elem),
            "weight grad": PassCost(flops, (x + y + w) * elem)}


def linear_costs(k: int, m: int, in_f: int, out_f: int, elem: int) -> dict[str, PassCost]:
    x, w, y = m * k * in_f, k * out_f * in_f, m * k * out_f
    flops = 2.0 * k * m * in_f * out_f
    return {p: PassCost(flops, (x + w + y) * elem) for p in PASSES}


def roofline_percent(cost: PassCost, ms: float, dtype: str, peaks: dict[str, float] | None) -> float | None:
    """100 * the roofline time (max of the compute and the memory floor) / the measured time."""
    if peaks is None or not ms or ms <= 0:
        return None
    floor_s = max(cost.flops / peaks[dtype], cost.bytes / peaks["hbm"])
    return 100.0 * floor_s / (ms * 1e-3)


def build_table(rows: list[dict], device: str, peaks: dict[str, float] | None) -> str:
    """Markdown of timed rows ``{"op", "shape", "dtype", "pass", "impl", "ms", "flops", "bytes"}``: one line per
    (op, shape, dtype, pass), one "ms (% roofline)" column per implementation in IMPLS order, and the Triton
    kernel's speed-up over cuDNN grouped. Missing timings show as "-"."""
    peak_line = ("peaks: " + ", ".join(f"{k} {v / 1e12:g} TFLOP/s" for k, v in peaks.items() if k != "hbm")
                 + f", HBM {peaks['hbm'] / 1e12:g} TB/s (dense datasheet values)") if peaks else (
        "peaks: unknown device, no %-of-roofline column")
    lines = [
        f"Device: {device}; {peak_line}. Median of CUDA-graph replays (triton.testing.do_bench_cudagraph), "
        "cudnn.benchmark on, channels_last, batch 128. Cells: ms (% of roofline).",
        "",
        "| op | shape | dtype | pass | " + " | ".join(IMPLS) + " | triton / cuDNN grouped |",
        "|" + "---|" * (len(IMPLS) + 5),
    ]
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        keyed.setdefault((r["op"], r["shape"], r["dtype"], r["pass"]), {})[r["impl"]] = r
    for (op, shape, dtype, pass_name), impls in keyed.items():
        cells = []
        for impl in IMPLS:
            r = impls.get(impl)
            if r is None or r.get("ms") is None:
                cells.append("-")
                continue
            pct = roofline_percent(PassCost(r["flops"], r["bytes"]), r["ms"], dtype, peaks)
            cells.append(f"{r['ms']:.4f}" + (f" ({pct:.0f}%)" if pct is not None else ""))
        tri, ref = impls.get(IMPLS[0], {}).get("ms"), impls.get(IMPLS[1], {}).get("ms")
        ratio = f"{ref / tri:.2f}x" if tri and ref else "-"
        lines.append(f"| {op} | {shape} | {dtype} | {pass_name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def _conv_pass_fns(k, n, cin, cout, kernel, stride, hw, dtype, device):
    """name -> {pass: zero-argument callable} for the four conv implementations, inputs made once."""
    from groupnet.kernels import grouped_conv2d as gc  # noqa: F401  (registers torch.ops.groupnet)

    cl = torch.channels_last
    pad, st, dil = [kernel // 2] * 2, [stride] * 2, [1, 1]
    precision = "tf32" if dtype == torch.float32 else "ieee"

    def make(groups, ci, co):
        x = torch.randn(n, groups * ci, hw, hw, device=device, dtype=dtype).contiguous(memory_format=cl)
        w = (torch.randn(groups * co, ci, kernel, kernel, device=device, dtype=dtype) / (ci * kernel**2) ** 0.5
             ).contiguous(memory_format=cl)
        y = F.conv2d(x, w, stride=stride, padding=kernel // 2, groups=groups)
        return x, w, torch.randn_like(y)

    def cudnn(x, w, dy, groups):
        bwd = torch.ops.aten.convolution_backward
        return {
            "forward": lambda: F.conv2d(x, w, stride=stride, padding=kernel // 2, groups=groups),
            "input grad": lambda: bwd(dy, x, w, None, st, pad, dil, False, [0, 0], groups, [True, False, False]),
            "weight grad": lambda: bwd(dy, x, w, None, st, pad, dil, False, [0, 0], groups, [False, True, False]),
        }

    x, w, dy = make(k, cin, cout)
    ops = torch.ops.groupnet
    triton_fns = {
        "forward": lambda: ops.grouped_conv2d_forward(x, w, None, st, pad, dil, k, None, precision),
        "input grad": lambda: ops.grouped_conv2d_backward_input(dy, w, None, list(x.shape), st, pad, dil, k, True,
                                                                 precision),
        "weight grad": lambda: ops.grouped_conv2d_backward_weight(x, dy, None, list(w.shape), False, st, pad, dil, k,
                                                                   True, precision),
    }
    branches = [cudnn(xi.contiguous(memory_format=cl), wi.contiguous(memory_format=cl),
                      di.contiguous(memory_format=cl), 1)
                for xi, wi, di in zip(x.chunk(k, 1), w.chunk(k, 0), dy.chunk(k, 1))]
    loop = {p: (lambda p=p: [b[p]() for b in branches]) for p in PASSES}
    dense_in, dense_out = round(cin * k**0.5), round(cout * k**0.5)
    dense = cudnn(*make(1, dense_in, dense_out), 1)
    return {IMPLS[0]: triton_fns, IMPLS[1]: cudnn(x, w, dy, k), IMPLS[2]: loop, IMPLS[3]: dense}


def _linear_pass_fns(k, m, in_f, out_f, dtype, device):
    from groupnet.kernels import grouped_gemm as gg  # noqa: F401  (registers torch.ops.groupnet)

    precision = "tf32" if dtype == torch.float32 else "ieee"
    x = torch.randn(m, k * in_f, device=device, dtype=dtype)
    w = torch.randn(k, out_f, in_f, device=device, dtype=dtype) / in_f**0.5
    dy = torch.randn(m, k * out_f, device=device, dtype=dtype)
    xs, dys = x.view(m, k, in_f).transpose(0, 1), dy.view(m, k, out_f).transpose(0, 1)
    ops = torch.ops.groupnet
    triton_fns = {
        "forward": lambda: ops.grouped_linear_forward(x, w, None, precision),
        "input grad": lambda: ops.grouped_linear_backward_input(dy, w, precision),
        "weight grad": lambda: ops.grouped_linear_backward_weight(dy, x, k, precision),
    }
    bmm = {"forward": lambda: torch.bmm(xs, w.transpose(1, 2)), "input grad": lambda: torch.bmm(dys, w),
           "weight grad": lambda: torch.bmm(dys.transpose(1, 2), xs)}
    loop = {
        "forward": lambda: [F.linear(x[:, i * in_f:(i + 1) * in_f], w[i]) for i in range(k)],
        "input grad": lambda: [dy[:, i * out_f:(i + 1) * out_f] @ w[i] for i in range(k)],
        "weight grad": lambda: [dy[:, i * out_f:(i + 1) * out_f].t() @ x[:, i * in_f:(i + 1) * in_f]
                                for i in range(k)],
    }
    di, do = round(in_f * k**0.5), round(out_f * k**0.5)
    xd, wd, dyd = (torch.randn(m, di, device=device, dtype=dtype), torch.randn(do, di, device=device, dtype=dtype),
                   torch.randn(m, do, device=device, dtype=dtype))
    dense = {"forward": lambda: F.linear(xd, wd), "input grad": lambda: dyd @ wd, "weight grad": lambda: dyd.t() @ xd}
    return {IMPLS[0]: triton_fns, IMPLS[1]: bmm, IMPLS[2]: loop, IMPLS[3]: dense}


def bench_graph_ms(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph; ``fn`` runs once outside the capture first (autotuning)."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))


def table_rows(batch: int, device: str) -> list[dict]:
    """Every timed row of the comparison table (GPU only)."""
    from groupnet.kernels import _launch_shapes as shapes

    rows = []
    for dtype_name, dtype in TABLE_DTYPES.items():
        elem = torch.finfo(dtype).bits // 8
        for s in shapes.CONV_SHAPES:
            label = f"{s.model}/K{s.branches} {s.cin}->{s.cout} k{s.kernel}s{s.stride} {s.size}px"
            fns = _conv_pass_fns(s.branches, batch, s.cin, s.cout, s.kernel, s.stride, s.size, dtype, device)
            dense_k = (round(s.cin * s.branches**0.5), round(s.cout * s.branches**0.5))
            for impl, passes in fns.items():
                costs = (conv_costs(1, batch, *dense_k, s.kernel, s.stride, s.size, elem) if impl == IMPLS[3]
                         else conv_costs(s.branches, batch, s.cin, s.cout, s.kernel, s.stride, s.size, elem))
                for pass_name, fn in passes.items():
                    if s.cin == 3 and pass_name == "input grad":
                        continue  # the stem's input needs no gradient
                    rows.append({"op": "conv", "shape": label, "dtype": dtype_name, "pass": pass_name, "impl": impl,
                                 "ms": bench_graph_ms(fn), "flops": costs[pass_name].flops,
                                 "bytes": costs[pass_name].bytes})
            print(f"timed {label} {dtype_name}", file=sys.stderr, flush=True)
        for s in shapes.LINEAR_SHAPES:
            label = f"{s.model}/K{s.branches} {s.in_features}->{s.out_features} M{batch}"
            fns = _linear_pass_fns(s.branches, batch, s.in_features, s.out_features, dtype, device)
            for impl, passes in fns.items():
                costs = (linear_costs(1, batch, round(s.in_features * s.branches**0.5),
                                      round(s.out_features * s.branches**0.5), elem) if impl == IMPLS[3]
                         else linear_costs(s.branches, batch, s.in_features, s.out_features, elem))
                for pass_name, fn in passes.items():
                    rows.append({"op": "linear", "shape": label, "dtype": dtype_name, "pass": pass_name,
                                 "impl": impl, "ms": bench_graph_ms(fn), "flops": costs[pass_name].flops,
                                 "bytes": costs[pass_name].bytes})
    return rows


def comparison_table(batch: int, out: str | None) -> int:
    """The one-command mode: time everything, print (and with ``out`` write) the markdown table."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True  # the tf32 rows: cuBLAS/cuDNN baselines on TF32 like the kernels
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_properties(0).name
    found = device_peaks(name)
    table = build_table(table_rows(batch, "cuda"), name, found[1] if found else None)
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", default=["linear", "conv"], choices=["linear", "conv"])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no timings")
    parser.add_argument("--table", action="store_true",
                        help="time the whole comparison (see the module docstring) and print it as markdown")
    parser.add_argument("--out", help="with --table: also write the markdown to this file")
    args = parser.parse_args(argv)
    if args.table:
        if not torch.cuda.is_available():
            print("benchmarks/gpu_kernels.py --table needs a CUDA GPU and none is available; nothing was run.",
                  file=sys.stderr)
            return 2
        return comparison_table(args.batch, args.out)

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 (set before running the script)")
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu_kernels.py needs a CUDA GPU and none is available; nothing was run.", file=sys.stderr)
            return 2
        device = "cuda"
        torch.backends.cudnn.benchmark = True  # cuDNN autotunes its algorithm per shape, as in training
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
        print(f"tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")

    rows, failures = run(args.ops, args.dtype, device, args.smoke, args.batch)
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
