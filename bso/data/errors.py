"""The error a dataset raises for files it cannot read (corrupt, truncated, not the expected
format): a user's problem with the data, reported as one ``error:`` line that names the file."""


class DataError(RuntimeError):
    """A dataset file exists but cannot be read; the message names the file and what to do."""
