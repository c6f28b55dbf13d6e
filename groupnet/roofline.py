"""Roofline ESTIMATES (never measurements) of the Triton kernels on an H100 SXM, for the shapes of real models.

``python -m groupnet.roofline [--batch 128] [--json]`` takes every grouped conv and classifier shape of the split
WRN-28-10 (K = 2 and 4, SplitNet's division rule, CIFAR-100, 32x32 inputs) from the model zoo itself, asks each
kernel module for the flops and minimum HBM bytes of its launches (``roofline_cases(workloads)``), and prints the
compute and memory floors against the H100's datasheet peaks. The kernels know no model: the shapes come from here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

H100_SXM_PEAKS = {
    # Dense (no sparsity) peaks of the H100 SXM5 from NVIDIA's datasheet; FLOP/s.
    "bf16": 989.4e12,
    "fp16": 989.4e12,
    "tf32": 494.7e12,
    "fp32": 66.9e12,  # CUDA cores (FMA): what fp32 dots with input_precision="ieee" run on
}
H100_SXM_HBM_BYTES_PER_S = 3.35e12
ASSUMED_LAUNCH_OVERHEAD_S = 3e-6  # typical launch + tail latency of one small kernel; an assumption, not measured

ROOFLINE_MODEL = "wrn-28-10"
ROOFLINE_BRANCHES = (2, 4)
ROOFLINE_CLASSES = 100
ROOFLINE_IMAGE = 32
LOSS_SHAPES = ((128, 4, 100, "fp32"), (256, 2, 1000, "bf16"), (256, 4, 1000, "bf16"), (64, 2, 32000, "bf16"))
"""(N, K, C, logits dtype) of co-training loss launches: CIFAR-100, ImageNet, and a 32k-class head."""


def model_layer_shapes(arch: str, branches: int, *, num_classes: int, image_size: int) -> tuple[list, list]:
    """(convs, linears) of ``arch`` split into K branches, from a forward pass on the meta device: for each grouped
    conv its module name, per-branch in/out channels, kernel, stride and input size; for each grouped linear its
    name and per-branch in/out features. Distinct shapes only, first module name kept."""
    import torch

    from groupnet.models import build_model
    from groupnet.modules import GroupedConv2d, GroupedLinear

    with torch.device("meta"):
        model = build_model(arch, branches=branches, num_classes=num_classes)
    convs: dict[tuple, str] = {}
    linears: dict[tuple, str] = {}

    def record(name):
        def hook(mod, inputs, _output):
            if isinstance(mod, GroupedConv2d):
                convs.setdefault((mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
                                  inputs[0].shape[2]), name)
            else:
                linears.setdefault((mod.in_features, mod.out_features), name)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (GroupedConv2d, GroupedLinear)):
            m.register_forward_hook(record(name))
    with torch.no_grad():
        model(torch.empty(1, 3 * branches, image_size, image_size, device="meta"))
    return ([(name, *shape) for shape, name in convs.items()], [(name, *shape) for shape, name in linears.items()])


def workloads(batch: int = 128) -> dict[str, list]:
    """Kernel module short name -> its workloads for the split WRN-28-10 at K = 2 and 4."""
    from groupnet.kernels.grouped_conv2d import ConvWorkload
    from groupnet.kernels.grouped_gemm import LinearWorkload

    out: dict[str, list] = {"grouped_conv2d": [], "grouped_gemm": []}
    for k in ROOFLINE_BRANCHES:
        convs, linears = model_layer_shapes(ROOFLINE_MODEL, k, num_classes=ROOFLINE_CLASSES, image_size=ROOFLINE_IMAGE)
        out["grouped_conv2d"] += [ConvWorkload(name, k, cin, cout, ks, s, hw, batch) for name, cin, cout, ks, s, hw in convs]
        out["grouped_gemm"] += [
            LinearWorkload(f"split {ROOFLINE_MODEL} {name}", k, batch, fin, fout) for name, fin, fout in linears
        ]
    return out


def roofline_rows(batch: int = 128, only: Sequence[str] | None = None) -> list[dict]:
    """Roofline ESTIMATES for every kernel module's cases on an H100 SXM (peaks in H100_SXM_PEAKS)."""
    import importlib

    from groupnet.kernels import cotrain_loss

    cases_by_module = {name: importlib.import_module(f"groupnet.kernels.{name}").roofline_cases(wl)
                       for name, wl in workloads(batch).items()}
    cases_by_module["cotrain_loss"] = cotrain_loss.roofline_cases(
        [cotrain_loss.LossWorkload(n, k, c, dtype) for n, k, c, dtype in LOSS_SHAPES]
    )
    rows = []
    for module, cases in cases_by_module.items():
        if only is not None and module not in only:
            continue
        for case in cases:
            dtype = case.get("dtype", "bf16")
            compute_s = case["flops"] / H100_SXM_PEAKS[dtype]
            memory_s = case["bytes"] / H100_SXM_HBM_BYTES_PER_S
            rows.append(
                {
                    "module": module,
                    "name": case["name"],
                    "dtype": dtype,
                    "flops": case["flops"],
                    "bytes": case["bytes"],
                    "intensity_flop_per_byte": case["flops"] / case["bytes"],
                    "compute_floor_us": compute_s * 1e6,
                    "memory_floor_us": memory_s * 1e6,
                    "roofline_floor_us": max(compute_s, memory_s) * 1e6,
                    "bound": "compute" if compute_s >= memory_s else "memory",
                    "notes": case.get("notes", ""),
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print("== Roofline ESTIMATES on an H100 SXM (not measurements) ==")
    print(
        "Assumed peaks: dense bf16/fp16 tensor {:.1f} TFLOP/s, tf32 {:.1f} TFLOP/s, fp32 FMA {:.1f} TFLOP/s, "
        "HBM3 {:.2f} TB/s. Launch overhead (~{:.0f} us per kernel, assumed) is not in the floor.".format(
            H100_SXM_PEAKS["bf16"] / 1e12,
            H100_SXM_PEAKS["tf32"] / 1e12,
            H100_SXM_PEAKS["fp32"] / 1e12,
            H100_SXM_HBM_BYTES_PER_S / 1e12,
            ASSUMED_LAUNCH_OVERHEAD_S * 1e6,
        )
    )
    print(f"{'module':<16} {'case':<56} {'dtype':>5} {'MFLOP':>10} {'MB':>9} {'F/B':>7} {'floor us':>9} {'bound':>7}")
    for r in rows:
        print(
            f"{r['module']:<16} {r['name']:<56} {r['dtype']:>5} {r['flops'] / 1e6:>10.2f} {r['bytes'] / 1e6:>9.3f} "
            f"{r['intensity_flop_per_byte']:>7.1f} {r['roofline_floor_us']:>9.3f} {r['bound']:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupnet.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="batch size of the launches [128]")
    parser.add_argument("--modules", nargs="+", help="kernel modules to report (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("python -m groupnet.roofline: needs triton (the kernel modules define the cases)", file=sys.stderr)
        return 2
    rows = roofline_rows(args.batch, args.modules)
    if args.json:
        json.dump(rows, sys.stdout)
        print()
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
