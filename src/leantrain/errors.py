"""The one exception type that means "the user's input is wrong".

The CLI prints a `LeantrainError` as a single line (no traceback unless --debug) and exits
non-zero; any other exception is a bug in leantrain and keeps its traceback.
"""


class LeantrainError(Exception):
    """Bad input or an unsupported request, with a message that says what to change."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line ("" for an empty message): what a
    one-line report or a table cell can hold."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def one_line(exc: BaseException) -> str:
    """"Type: first line of the message" (the type alone for an empty message)."""
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def bounded_repr(value: object, limit: int = 200) -> str:
    """repr(value) for an error message, bounded before it is built: a YAML alias nested nine
    deep is a billion elements to repr() but a few shared objects in memory."""
    import reprlib

    shown = reprlib.Repr()  # (keyword arguments from Python 3.12 only)
    shown.maxlevel, shown.maxstring, shown.maxother = 3, limit, limit
    shown.maxlist = shown.maxdict = shown.maxtuple = shown.maxset = 6
    return shorten(shown.repr(value), limit)


def shorten(value: object, limit: int = 200) -> str:
    """A value echoed in a one-line error, cut to `limit` characters (a hostile file's value
    may be megabytes, or a YAML alias expanded without end)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
