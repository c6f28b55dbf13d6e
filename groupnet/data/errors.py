"""The error a data set raises when its files are missing or malformed: the trainer prints it as one line."""


class DataError(ValueError):
    """A data set cannot be read; the message says what was expected where and what was found."""
