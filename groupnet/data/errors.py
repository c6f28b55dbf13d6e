"""The error a data set raises when its files are missing or malformed: the trainer prints it as one line."""

from __future__ import annotations


class DataError(ValueError):
    """A data set cannot be read; the message says what was expected where and what was found.

    Raised in a DataLoader worker process, it is re-raised in the main process with the worker's traceback as its
    message; only the original message is kept, so the user reads one line naming the file."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and "Original Traceback" in args[0]:
            lines = [line for line in args[0].strip().splitlines() if line.strip()]
            last = lines[-1] if lines else ""
            marker = f"{type(self).__name__}: "
            args = (last.split(marker, 1)[1] if marker in last else last,)
        super().__init__(*args)
