"""Real trainer processes stopped at a chosen point, for the crash-window tests.

:func:`spawn` starts ``python -c`` in a new process that patches the trainer (from the test side, nothing of this
ships in the library) and then runs ``python -m groupnet.train`` with the given arguments:

- ``die_after_save=N``: the process ends with ``os._exit(9)`` (no cleanup, like kill -9) right after its N-th
  checkpoint write (``checkpoint.atomic_save``) completed;
- ``die_in_save=N``: it ends half-way through writing its N-th checkpoint (a partial temporary file on disk);
- ``rising_accuracy``: each epoch reports a test accuracy one point above the previous epoch's, so every epoch is
  the best so far and writes ``best.pt`` (the true accuracy of these tiny runs often ties);
- ``fixed_stamp``: ``time.strftime`` returns one fixed value, as for runs started in the same second;
- ``hold_until=PATH``: the first training epoch creates ``PATH + ".started"`` and waits until ``PATH`` exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from groupnet.training import trainer as trainer_module
from groupnet.training.trainer import Trainer

TESTS = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
from helpers.crash_runs import patch
patch(die_after_save={die_after_save!r}, die_in_save={die_in_save!r}, rising_accuracy={rising_accuracy!r},
      fixed_stamp={fixed_stamp!r}, hold_until={hold_until!r})
from groupnet.train import main
sys.exit(main({argv!r}))
"""


def rising_accuracy_evaluate(real_evaluate):
    def evaluate(self):
        row = dict(real_evaluate(self))
        row["test_acc_ensemble"] = 10.0 + len(self.history)
        return row
    return evaluate


def patch(die_after_save: int | None = None, die_in_save: int | None = None, rising_accuracy: bool = False,
          fixed_stamp: str | None = None, hold_until: str | None = None) -> None:
    import time

    import torch

    from groupnet.training import checkpoint, loop

    if die_after_save is not None or die_in_save is not None:
        real_save = checkpoint.atomic_save
        real_torch_save = torch.save
        count = {"n": 0}

        def partial_torch_save(obj, f, *args, **kwargs):
            real_torch_save(obj, f, *args, **kwargs)
            f.flush()
            f.truncate(f.tell() // 2)
            f.flush()
            os._exit(9)

        def save(obj, path):
            count["n"] += 1
            if count["n"] == die_in_save:
                torch.save = partial_torch_save
            real_save(obj, path)
            if count["n"] == die_after_save:
                os._exit(9)

        checkpoint.atomic_save = save
    if rising_accuracy:
        Trainer.evaluate = rising_accuracy_evaluate(Trainer.evaluate)
    if fixed_stamp is not None:
        real_strftime = time.strftime
        time.strftime = lambda fmt, *a: fixed_stamp if fmt == "%Y%m%d-%H%M%S" else real_strftime(fmt, *a)
    if hold_until is not None:
        real_epoch = loop.train_one_epoch

        def held_epoch(*args, **kwargs):
            Path(hold_until + ".started").touch()
            deadline = time.monotonic() + 240
            while not Path(hold_until).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            return real_epoch(*args, **kwargs)

        trainer_module.train_one_epoch = held_epoch


def spawn(argv: list[str], cwd: Path, **patches) -> subprocess.Popen:
    """Start the patched trainer process (stdout and stderr captured as text)."""
    options = {"die_after_save": None, "die_in_save": None, "rising_accuracy": False, "fixed_stamp": None,
               "hold_until": None, **patches}
    code = SCRIPT.format(tests=str(TESTS), argv=list(argv), **options)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(argv: list[str], cwd: Path, timeout: float = 300, **patches) -> subprocess.CompletedProcess:
    proc = spawn(argv, cwd, **patches)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
