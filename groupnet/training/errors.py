"""Errors the trainer reports to the user as one line on stderr (exit status 2), never as a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad option, a missing file, an unusable checkpoint."""


class ConfigError(UserError):
    """An impossible or unknown option (from the command line or a config file)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that does not fit the requested run."""


class TrainingDiverged(UserError):
    """The loss, a parameter or a buffer became NaN or infinite; the diverged epoch is not saved."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a run: says which folder holds which epoch, if any."""

    def __init__(self, run_dir, saved_epoch: int | None) -> None:
        super().__init__()
        self.run_dir, self.saved_epoch = run_dir, saved_epoch

    def message(self) -> str:
        if self.run_dir is None:
            return "interrupted before the run folder was created; nothing was written"
        if self.saved_epoch is None:
            return f"interrupted before the first epoch completed; nothing was saved in {self.run_dir}"
        return (f"interrupted; {self.run_dir}/last.pt holds epoch {self.saved_epoch} (continue with --resume "
                f"{self.run_dir})")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (parser messages from yaml and torch span several)."""
    return " ".join(str(e).split())
