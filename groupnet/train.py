"""``python -m groupnet.train``: co-train K branches of a divided network as one grouped model.

With no arguments it trains the embedded default (scikit-learn digits, small_cnn, K=2) and the K=1 baseline, and
prints per-branch and ensemble test accuracy. ``--help`` lists the options; ``--config FILE`` (YAML or TOML) sets
any of them. Multi-process: ``torchrun --nproc_per_node N -m groupnet.train ...`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import sys

# Only the parser's torch-free modules at import time: ``--help`` exits inside parse_options before the training
# stack (torch, the models, the data) is imported.
from groupnet.training.config import parse_options
from groupnet.training.errors import RunInterrupted, UserError, one_line


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        from_file, from_cli = parse_options(argv)
    except UserError as e:
        print(f"groupnet.train: error: {one_line(e)}", file=sys.stderr)
        return 2
    from groupnet.data.errors import DataError
    from groupnet.training.distributed import destroy_process_group
    from groupnet.training.trainer import config_for_run, run

    try:
        recipe, options, ckpt = config_for_run(from_file, from_cli)
        if options.print_config:
            print(json.dumps(recipe.to_dict(), indent=2))
            return 0
        run(recipe, options, ckpt)
        destroy_process_group(wait_for_all=True)
        return 0
    except (UserError, DataError) as e:
        print(f"groupnet.train: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        message = e.message() if isinstance(e, RunInterrupted) else "interrupted before the run started"
        print(f"groupnet.train: {message}", file=sys.stderr)
        return 130
    finally:
        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
