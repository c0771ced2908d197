"""The one exception type that means "the user's input is wrong".

The CLI prints a `LeantrainError` as a single line (no traceback unless --debug) and exits
non-zero; any other exception is a bug in leantrain and keeps its traceback.
"""


class LeantrainError(Exception):
    """Bad input or an unsupported request, with a message that says what to change."""
