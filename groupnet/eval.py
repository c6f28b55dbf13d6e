"""``python -m groupnet.eval CHECKPOINT``: per-branch and ensemble test accuracy of a trained checkpoint.

The checkpoint (a ``last.pt``/``best.pt`` file or a run folder) describes its model and data set; options here
only change where the data is read and how: ``--data-dir``, ``--device``, ``--batch-size``, ``--ensemble``,
``--workers``, and ``--export-branches`` to write each branch as a standalone program (see
:mod:`groupnet.training.export`).
"""

from __future__ import annotations

import argparse
import sys

# torch-free (the parser): the training stack is imported after the arguments are parsed, so --help is fast
from groupnet.training.config import ENSEMBLE_MODES


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="python -m groupnet.eval",
                                description="Per-branch and ensemble test accuracy of a trained checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint file (last.pt, best.pt) or a run folder")
    p.add_argument("--data-dir", help="where the data set is now (default: as recorded in the checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ensemble", choices=ENSEMBLE_MODES, help="ensemble mode (default: the checkpoint's)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--export-branches", action="store_true", help="also write export/branch_k.pt2 in the run folder")
    p.add_argument("--branch-parallel", type=int, default=1, metavar="B",
                   help="spread the K branches over B ranks (under torchrun --nproc_per_node P; B divides K and P)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate a checkpoint; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from groupnet import training
    from groupnet.data.errors import DataError
    from groupnet.training.distributed import destroy_process_group
    from groupnet.training.errors import UserError, one_line

    for option, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < low:  # checked here: the recipe would name its own option (--eval-batch-size)
            print(f"groupnet.eval: error: {option} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    options = training.RunOptions(device=args.device, workers=args.workers, export_branches=args.export_branches,
                                  progress=False, branch_parallel=args.branch_parallel)
    recipe_changes = {"eval_batch_size": args.batch_size}
    if args.data_dir is not None:
        recipe_changes["data_dir"] = args.data_dir
    if args.ensemble is not None:
        recipe_changes["ensemble"] = args.ensemble
    try:
        training.evaluate_checkpoint(args.checkpoint, options, **recipe_changes)
        return 0
    except (UserError, DataError) as e:
        print(f"groupnet.eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
