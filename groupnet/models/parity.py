"""Parameter parity of the division: the K-branch model's total parameters against the unsplit network's.

``python -m groupnet.models.parity`` prints the markdown table (model, K, rule, per-branch config, params, ratio)
for the README. Models are built on the meta device: nothing is allocated, so the large ones cost nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from groupnet.models.registry import build_model

DEFAULT_ARCHS = ("small_cnn", "resnet56", "resnet110", "resnet164", "wrn-16-8", "wrn-28-10", "wrn-40-10",
                 "resnext29-8x64d")


@dataclass(frozen=True)
class ParityRow:
    arch: str
    branches: int
    rule: str
    config: str
    params: int
    ratio: float


def count_params(arch: str, branches: int, *, rule: str = "splitnet", num_classes: int | None = None,
                 in_channels: int | None = None) -> tuple[int, str]:
    """Total parameters of ``arch`` divided into K branches, and the per-branch config.

    Defaults: small_cnn 10 classes and 1 channel (8x8 digits), the CIFAR families 100 classes and 3 channels.
    """
    small = arch.startswith("small")
    num_classes = num_classes or (10 if small else 100)
    in_channels = in_channels or (1 if small else 3)
    with torch.device("meta"):
        model = build_model(arch, branches=branches, num_classes=num_classes, in_channels=in_channels,
                            divide_rule=rule)
    return sum(p.numel() for p in model.parameters()), model.spec.describe()


def parity_rows(archs: Sequence[str] = DEFAULT_ARCHS, branches: Sequence[int] = (1, 2, 4, 8),
                rules: Sequence[str] = ("splitnet", "parity"), num_classes: int = 100) -> list[ParityRow]:
    """One row per (arch, rule, K): params and their ratio to the unsplit (K=1) network."""
    rows = []
    for arch in archs:
        nc = 10 if arch.startswith("small") else num_classes
        base, _ = count_params(arch, 1, num_classes=nc)
        for rule in rules:
            for k in branches:
                if k == 1 and rule != rules[0]:
                    continue
                try:
                    params, config = count_params(arch, k, rule=rule, num_classes=nc)
                except ValueError as e:  # a SplitNet rule that does not apply at this K
                    rows.append(ParityRow(arch, k, rule, f"n/a: {e}", 0, float("nan")))
                    continue
                rows.append(ParityRow(arch, k, rule if k > 1 else "-", config, params, params / base))
    return rows


def parity_markdown(rows: Sequence[ParityRow]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | K | rule | per-branch config | params | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.arch} | {r.branches} | {r.rule} | {r.config} | {r.params:,} | {r.ratio:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--branches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--rules", nargs="+", default=["splitnet", "parity"], choices=["splitnet", "parity"])
    parser.add_argument("--num-classes", type=int, default=100, help="head size (small_cnn always uses 10)")
    args = parser.parse_args(argv)
    print(parity_markdown(parity_rows(args.archs, args.branches, args.rules, args.num_classes)))


if __name__ == "__main__":
    main()
