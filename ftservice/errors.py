"""The one exception type the CLI turns into a clean message (no traceback) and exit code."""


class FtserviceError(Exception):
    """An error for people: its message says what is wrong, where, and what to do."""

    exit_code = 1
