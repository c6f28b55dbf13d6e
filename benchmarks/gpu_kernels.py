"""Check and time groupnet's Triton kernels on a CUDA GPU against cuBLAS/cuDNN, for split WRN-28-10 shapes.

    python benchmarks/gpu_kernels.py [--dtype bf16 fp32] [--ops linear conv] [--csv out.csv]

For each shape (K = 2, 4; batch 128; widths from SplitNet's rule: widen 10 -> 7 at K=2, 5 at K=4):

1. correctness: the Triton op's output and gradients against torch's (cuBLAS ``bmm`` for the grouped linear,
   cuDNN ``F.conv2d(groups=K)`` for the grouped conv), computed from the same inputs;
2. timing (median of ``triton.testing.do_bench``, ms), forward and forward+backward, of: the Triton op, torch's
   fused grouped op (``bmm`` / grouped ``F.conv2d``), and a per-branch loop of ``F.linear`` / ``F.conv2d``.

The conv rows appear when ``kernels/grouped_conv2d.py`` exists. Without a CUDA GPU the script exits with status 2.
``--smoke`` runs only the correctness part on tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (to test the
script itself; no timings).
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
    from triton.testing import do_bench

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", default=["linear", "conv"], choices=["linear", "conv"])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no timings")
    args = parser.parse_args(argv)

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 (set before running the script)")
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu_kernels.py needs a CUDA GPU and none is available; nothing was run.", file=sys.stderr)
            return 2
        device = "cuda"
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
