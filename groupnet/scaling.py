"""Model scaling: grow a zoo network's flops by s along depth, width, resolution, their compounds, or the number
of networks K; and SplitNet's K-splitting, which keeps flops and params and trades them for K networks.

Scaling laws (Dollar et al., "Fast and Accurate Model Scaling", CVPR 2021; pycls/models/scaler.py), for a conv net
of depth d, width w and resolution r: flops ~ d*w^2*r^2, params ~ d*w^2, acts ~ d*w*r^2; K branches multiply all
three by K. To scale flops by s, split s into exponents e_d + e_w + e_r + e_k = 1 (a pycls-style type string:
letters with optional weights, ``"dwr"``, ``"d1_w8_r1"``, extended with ``k`` for K):
d -> s^e_d * d, w -> s^(e_w/2) * w, r -> s^(e_r/2) * r, K -> s^e_k * K. Then params grow by s^(e_d+e_w+e_k) and
acts by s^(e_d+e_w/2+e_r+e_k):

- ``depth`` (d): params s, acts s.   ``width`` (w): params s, acts sqrt(s).   ``resolution`` (r): params 1, acts s.
- ``dwr`` (uniform compound): params s^(2/3), acts s^(5/6).
- ``fast`` (dWr, alpha; e_w = alpha, e_d = e_r = (1-alpha)/2; pycls recommends alpha = 0.8): params s^((1+alpha)/2),
  acts s^(1-alpha/2), i.e. s^0.9 and s^0.6 at alpha = 0.8.
- ``branches`` (k): K -> s*K at fixed per-branch width: flops, params and acts all s (like depth, but parallel).
- ``split`` (SplitNet, not a flops scaling): K -> t*K, every width / sqrt(t): flops and params stay, acts grow
  by sqrt(t). This is the honest cost of the division to report next to its accuracy.

Rounding (pycls): per-stage depth round(d*D) >= 1; widths to the nearest multiple of ``divisor`` (default 4, finer
than pycls's 8 because CIFAR widths start at 16; bottleneck widths to a multiple of the cardinality too, which is
kept, so the width per group scales); resolution to a multiple of 4; K to the nearest int. The ratios reported are
measured with :func:`groupnet.complexity.complexity` on the built models, not the nominal ones.

CLI: ``python -m groupnet.scaling --model wrn --depth 16 --width 4 --factors 2 4 8 [--time] [--csv F] [--plot F]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

# torch and the models are imported inside the functions that use them, so that --help needs neither
if TYPE_CHECKING:
    from groupnet.complexity import Complexity
    from groupnet.models import ArchSpec

LETTERS = ("d", "w", "r", "k")
STRATEGIES = ("depth", "width", "resolution", "dwr", "fast", "branches", "split")
_NAMED_TYPES = {"depth": "d", "width": "w", "resolution": "r", "dwr": "dwr", "branches": "k"}


@dataclass(frozen=True)
class NetConfig:
    """A network to scale: K branches of one per-branch :class:`ArchSpec` at input resolution ``r``."""

    spec: ArchSpec
    branches: int
    resolution: int

    def describe(self) -> str:
        """A one-line summary, e.g. ``K=2 r=32 d=9,9,9 w=12,24,48 stem=12``."""
        return f"K={self.branches} r={self.resolution} {self.spec.describe()}"


def fast_type(alpha: float = 0.8) -> str:
    """The type string of fast compound scaling dWr(alpha): e_w = alpha, e_d = e_r = (1 - alpha)/2."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rest = (1 - alpha) / 2
    return f"d{rest:g}_w{alpha:g}_r{rest:g}"


def parse_type(scaling_type: str) -> dict[str, float]:
    """Exponent weights of a type string: ``"dwr"`` (equal weights) or ``"d1_w8_r1"`` (letter+weight pairs).

    Letters: d (depth), w (width), r (resolution), k (number of branches); missing letters weigh 0.
    """
    weights = dict.fromkeys(LETTERS, 0.0)
    if re.fullmatch(r"[dwrk]+", scaling_type or ""):
        for ch in scaling_type:
            weights[ch] = 1.0
    else:
        parts = (scaling_type or "").split("_")
        for part in parts:
            m = re.fullmatch(r"([dwrk])(\d+(?:\.\d*)?(?:e-?\d+)?)", part)
            if not m:
                raise ValueError(f"bad scaling type {scaling_type!r}: use letters of {LETTERS} ('dwr') or "
                                 "letter+weight pairs ('d1_w8_r1')")
            weights[m.group(1)] = float(m.group(2))
    if sum(weights.values()) <= 0:
        raise ValueError(f"scaling type {scaling_type!r} gives every dimension weight 0")
    return weights


def scale_factors(factor: float, scaling_type: str) -> dict[str, float]:
    """The nominal multipliers of depth, width, resolution and K that scale flops by ``factor``."""
    if factor <= 0:
        raise ValueError(f"the flops factor must be > 0, got {factor}")
    w = parse_type(scaling_type)
    total = sum(w.values())
    e = {ch: v / total for ch, v in w.items()}
    f = {"d": factor ** e["d"], "w": factor ** (e["w"] / 2), "r": factor ** (e["r"] / 2), "k": factor ** e["k"]}
    assert math.isclose(f["d"] * f["w"] ** 2 * f["r"] ** 2 * f["k"], factor, rel_tol=1e-9)
    return f


def scale(config: NetConfig, factor: float, scaling_type: str, *, divisor: int = 4) -> NetConfig:
    """``config`` with flops scaled by about ``factor`` along the dimensions of ``scaling_type``."""
    from groupnet.models.divide import scale_widths

    f = scale_factors(factor, scaling_type)
    spec = config.spec
    if f["d"] != 1:
        spec = spec.replace(depths=tuple(max(1, round(d * f["d"])) for d in spec.depths))
    if f["w"] != 1:
        spec = scale_widths(spec, f["w"], divisor)
    resolution = config.resolution if f["r"] == 1 else max(4, round(config.resolution * f["r"] / 4) * 4)
    branches = max(1, round(config.branches * f["k"]))
    return NetConfig(spec, branches, resolution)


def split(config: NetConfig, t: float, *, divisor: int = 4) -> NetConfig:
    """SplitNet's K-splitting generalised: K -> t*K branches, every width / sqrt(t); flops and params about kept."""
    from groupnet.models.divide import scale_widths

    branches = max(1, round(config.branches * t))
    achieved = branches / config.branches
    spec = scale_widths(config.spec, 1 / math.sqrt(achieved), divisor) if achieved != 1 else config.spec
    return NetConfig(spec, branches, config.resolution)


def scaled_config(config: NetConfig, strategy: str, factor: float, *, alpha: float = 0.8,
                  divisor: int = 4) -> NetConfig:
    """``config`` scaled by ``factor`` with a named strategy (see :data:`STRATEGIES`) or a type string."""
    if strategy == "split":
        return split(config, factor, divisor=divisor)
    scaling_type = fast_type(alpha) if strategy == "fast" else _NAMED_TYPES.get(strategy, strategy)
    return scale(config, factor, scaling_type, divisor=divisor)


def achieved_factors(base: NetConfig, config: NetConfig) -> dict[str, float]:
    """The multipliers ``config`` really has over ``base`` after rounding: depth (total blocks), width (geometric
    mean over the stages), resolution and K."""
    b, c = base.spec, config.spec
    width = math.prod(w / v for w, v in zip(c.widths, b.widths)) ** (1 / len(b.widths))
    return {"d": sum(c.depths) / sum(b.depths), "w": width, "r": config.resolution / base.resolution,
            "k": config.branches / base.branches}


def measure(config: NetConfig, *, in_channels: int = 3, num_classes: int = 10) -> Complexity:
    """flops, params and acts of ``config`` (built on the meta device: nothing allocated)."""
    import torch

    from groupnet.complexity import complexity
    from groupnet.models import build_from_spec

    with torch.device("meta"):
        model = build_from_spec(config.spec, branches=config.branches, num_classes=num_classes,
                                in_channels=in_channels)
    return complexity(model, (in_channels, config.resolution, config.resolution))


def measure_time(config: NetConfig, *, in_channels: int = 3, num_classes: int = 10, batch_size: int = 8,
                 repeats: int = 5) -> tuple[float, float]:
    """Median CPU wall time in ms of one training step (forward, backward, SGD step) and one inference forward at
    ``batch_size``, channels_last, after one warm-up step."""
    import torch
    import torch.nn.functional as F

    from groupnet.models import build_from_spec

    model = build_from_spec(config.spec, branches=config.branches, num_classes=num_classes, in_channels=in_channels)
    model = model.to(memory_format=torch.channels_last)
    k, r = config.branches, config.resolution
    x = torch.randn(batch_size, k * in_channels, r, r).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        logits = model(x).view(batch_size, k, num_classes)
        loss = sum(F.cross_entropy(logits[:, b], y) for b in range(k))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    train_ms = _median_ms(train_step, repeats)
    model.eval()
    infer_ms = _median_ms(infer_step, repeats)
    return train_ms, infer_ms


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class ScalingRow:
    """One scaled network: its config, measured counts and ratios to the base network (and optional times)."""

    strategy: str
    factor: float
    config: NetConfig
    counts: Complexity
    ratios: dict[str, float]
    train_ms: float | None = None
    infer_ms: float | None = None

    def as_dict(self) -> dict[str, object]:
        c = self.counts
        out: dict[str, object] = {
            "strategy": self.strategy, "factor": self.factor, "config": self.config.describe(),
            "branches": self.config.branches, "resolution": self.config.resolution,
            "flops": c.flops, "params": c.params, "acts": c.acts,
            "flops_ratio": round(self.ratios["flops"], 4), "params_ratio": round(self.ratios["params"], 4),
            "acts_ratio": round(self.ratios["acts"], 4),
        }
        if self.train_ms is not None:
            out.update(train_ms=round(self.train_ms, 3), infer_ms=round(self.infer_ms, 3))
        return out


def scaling_rows(base: NetConfig, factors: Sequence[float], strategies: Sequence[str] = STRATEGIES, *,
                 alpha: float = 0.8, divisor: int = 4, in_channels: int = 3, num_classes: int = 10,
                 timed: bool = False, batch_size: int = 8, repeats: int = 5) -> list[ScalingRow]:
    """The base network and every (strategy, factor), measured; times only with ``timed``."""
    base_counts = measure(base, in_channels=in_channels, num_classes=num_classes)
    todo = [("base", 1.0, base)] + [(s, f, scaled_config(base, s, f, alpha=alpha, divisor=divisor))
                                    for s in strategies for f in factors]
    rows = []
    for strategy, factor, config in todo:
        counts = (base_counts if config == base
                  else measure(config, in_channels=in_channels, num_classes=num_classes))
        ratios = {n: getattr(counts, n) / getattr(base_counts, n) for n in ("flops", "params", "acts")}
        times = (measure_time(config, in_channels=in_channels, num_classes=num_classes, batch_size=batch_size,
                              repeats=repeats) if timed else (None, None))
        rows.append(ScalingRow(strategy, factor, config, counts, ratios, *times))
    return rows


def format_table(rows: Sequence[ScalingRow]) -> str:
    """The rows as a text table with the counting conventions."""
    from groupnet.complexity import CONVENTIONS

    dicts = [r.as_dict() for r in rows]
    cols = ["strategy", "factor", "config", "flops", "params", "acts", "flops_ratio", "params_ratio", "acts_ratio"]
    if dicts and "train_ms" in dicts[0]:
        cols += ["train_ms", "infer_ms"]
    cells = [[_cell(d[c]) for c in cols] for d in dicts]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i == 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    lines.append(f"Conventions: {CONVENTIONS}. Ratios are measured against the base row.")
    if "train_ms" in cols:
        lines.append("Times: median CPU wall ms of a training step / an inference forward at the given batch size.")
    return "\n".join(lines)


def write_csv(rows: Sequence[ScalingRow], path: str) -> None:
    """The rows of :func:`format_table` as CSV (one header line, then one line per config)."""
    dicts = [r.as_dict() for r in rows]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)


def write_plot(rows: Sequence[ScalingRow], path: str) -> None:
    """PNG, one line per strategy: training time vs flops and vs acts when timed, else params and acts vs flops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = rows[0].train_ms is not None
    panels = ([("flops", "train_ms"), ("acts", "train_ms")] if timed else [("flops", "params"), ("flops", "acts")])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    base = rows[0]
    for ax, (xname, yname) in zip(axes, panels):
        for strategy in dict.fromkeys(r.strategy for r in rows[1:]):
            pts = [base] + sorted((r for r in rows if r.strategy == strategy), key=lambda r: r.factor)
            ax.plot([_value(r, xname) for r in pts], [_value(r, yname) for r in pts], marker="o", label=strategy)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("flops (MACs per image)" if xname == "flops" else f"{xname} per image")
        ax.set_ylabel("training step time (ms)" if yname == "train_ms" else f"{yname}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"scaling from {base.config.describe()}", fontsize=9)
    fig.text(0.01, 0.01, "flops = MACs incl. bias; acts = conv/linear output elements (pycls conventions)", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value(row: ScalingRow, name: str) -> float:
    return row.train_ms if name == "train_ms" else getattr(row.counts, name)


def _cell(v: object) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def base_config(args: argparse.Namespace) -> tuple[NetConfig, int]:
    """The CLI's base network and its input channels."""
    from groupnet.models import arch_spec, divide
    from groupnet.models.divide import scale_widths

    if args.arch:
        arch = args.arch
    elif args.model == "wrn":
        arch = f"wrn-{args.depth or 16}-{args.width or 4}"
    elif args.model == "resnet":
        arch = f"resnet{args.depth or 56}"
    elif args.model == "resnext":
        arch = f"resnext{args.depth or 29}-{args.cardinality}x{args.width or 64}d"
    else:
        arch = "small_cnn"
    spec = arch_spec(arch)
    if args.model == "resnet" and args.width and not args.arch:
        spec = scale_widths(spec, args.width / spec.stem_width, 1)
    spec = divide(spec, args.branches)
    small = spec.family == "small_cnn"
    resolution = args.resolution or (8 if small else 32)
    return NetConfig(spec, args.branches, resolution), args.in_channels or (1 if small else 3)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (``python -m groupnet.scaling --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m groupnet.scaling",
        description="Scale a zoo network's flops by each factor along depth, width, resolution, compounds and the "
                    "number of networks K; print flops/params/acts (pycls conventions) and optionally CPU times.")
    parser.add_argument("--model", choices=["wrn", "resnet", "resnext", "small_cnn"], default="wrn")
    parser.add_argument("--arch", help="a zoo arch name instead of --model/--depth/--width (e.g. resnet110)")
    parser.add_argument("--depth", type=int, help="wrn/resnet/resnext depth (defaults 16/56/29)")
    parser.add_argument("--width", type=int,
                        help="wrn widen factor k / resnet base width / resnext width per group (defaults 4/16/64)")
    parser.add_argument("--cardinality", type=int, default=8, help="resnext cardinality")
    parser.add_argument("--branches", type=int, default=1, help="K of the base network (divided by SplitNet's rule)")
    parser.add_argument("--resolution", type=int, help="input resolution (default 32; small_cnn 8)")
    parser.add_argument("--in-channels", type=int, help="input channels (default 3; small_cnn 1)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--factors", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        help=f"names from {STRATEGIES} or pycls-style type strings such as d1_w8_r1_k1")
    parser.add_argument("--alpha", type=float, default=0.8, help="fast compound scaling's width exponent")
    parser.add_argument("--divisor", type=int, default=4, help="widths are rounded to multiples of this")
    parser.add_argument("--time", action="store_true", help="measure CPU time of a training and inference step")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of --time")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per config (median) for --time")
    parser.add_argument("--csv", help="write the table as CSV to this path")
    parser.add_argument("--plot", help="write a PNG: time vs flops and vs acts (with --time), else params and acts "
                                       "vs flops")
    args = parser.parse_args(argv)
    base, in_channels = base_config(args)
    rows = scaling_rows(base, args.factors, args.strategies, alpha=args.alpha, divisor=args.divisor,
                        in_channels=in_channels, num_classes=args.num_classes, timed=args.time,
                        batch_size=args.batch_size, repeats=args.repeats)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        write_plot(rows, args.plot)
    return 0


__all__ = [
    "STRATEGIES", "NetConfig", "ScalingRow", "achieved_factors", "fast_type", "format_table", "measure", "measure_time", "parse_type",
    "scale", "scale_factors", "scaled_config", "scaling_rows", "split", "write_csv", "write_plot", "main",
]

if __name__ == "__main__":
    sys.exit(main())
