"""Errors the trainer reports to the user as one line on stderr (exit status 2), never as a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad option, a missing file, an unusable checkpoint."""


class ConfigError(UserError):
    """An impossible or unknown option (from the command line or a config file)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that does not fit the requested run."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (parser messages from yaml and torch span several)."""
    return " ".join(str(e).split())
