"""Training cost of one NetAug step against one plain co-training step, and what the weight slices cost.

Timed single-threaded in process CPU time (as ``cpu_time_ab.py``: robust to a loaded machine), median of the
repeats, candidates interleaved:

- ``plain``: the zoo model of the tiny widths, ``default_step`` (forward, co-training loss, backward) + SGD step;
- ``netaug``: the super-model, the tiny model's step and one sampled augmented model's forward/backward (the
  configurations drawn as in training, width augmentation on) + SGD step;
- ``netaug-min``: the super-model run at its minimum configuration only (the tiny step through dynamic layers,
  no augmented pass): what the slices cost by themselves;
- ``slices``: only the per-forward copies of the active conv weights at sampled configurations (no compute).

    python benchmarks/netaug_step.py small_cnn:1 small_cnn:2 mobilenetv2_tiny:1 mobilenetv2_tiny:2 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from groupnet.cotraining import CoTrainingLoss
from groupnet.models import build_model
from groupnet.modules.dynamic import DynamicGroupedConv2d
from groupnet.netaug import make_dynamic
from groupnet.training.netaug_hook import augmented_loss


def _cpu() -> float:
    return time.process_time()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="+", help="arch:K")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| model | K | plain ms/step | netaug ms/step | ratio | netaug-min ms/step | slice copies ms/step |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        arch, k = case.split(":")
        k = int(k)
        torch.manual_seed(0)
        tiny = build_model(arch, branches=k, num_classes=10, in_channels=1)
        tiny.execution_order = "grouped"
        big, space = make_dynamic(build_model(arch, branches=k, num_classes=10, in_channels=1))
        loss_fn = CoTrainingLoss(k, weight=0.5, check_finite=False, check_targets=False)
        x = torch.randn(args.batch, k, 8, 8)
        y = torch.randint(0, 10, (args.batch,))
        gen = torch.Generator().manual_seed(0)
        opt_plain = torch.optim.SGD(tiny.parameters(), lr=0.01, momentum=0.9)
        opt_big = torch.optim.SGD(big.parameters(), lr=0.01, momentum=0.9)
        convs = [m for m in big.modules() if isinstance(m, DynamicGroupedConv2d)]

        def plain() -> None:
            opt_plain.zero_grad()
            loss_fn(tiny(x), y).loss.backward()
            opt_plain.step()

        def netaug(augment: bool = True) -> None:
            opt_big.zero_grad()
            space.set_min()
            loss_fn(big(x), y).loss.backward()
            if augment:
                space.set(space.sample(gen))
                augmented_loss(big(x), y, k).backward()
                space.set_min()
            opt_big.step()

        def slices() -> None:
            space.set(space.sample(gen))
            with torch.no_grad():
                for _ in range(3):  # the tiny pass and the augmented forward, then the backward's scatter (~ 1 copy)
                    for m in convs:
                        m.active_parameters()
            space.set_min()
            with torch.no_grad():
                for m in convs:
                    m.active_parameters()

        candidates = {"plain": plain, "netaug": netaug, "netaug-min": lambda: netaug(False), "slices": slices}
        times: dict[str, list[float]] = {n: [] for n in candidates}
        for f in candidates.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for name, f in candidates.items():
                start = _cpu()
                for _ in range(args.steps):
                    f()
                times[name].append((_cpu() - start) / args.steps * 1e3)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"| {arch} | {k} | {med['plain']:.2f} | {med['netaug']:.2f} | {med['netaug'] / med['plain']:.2f} | "
              f"{med['netaug-min']:.2f} | {med['slices']:.3f} |")


if __name__ == "__main__":
    main()
