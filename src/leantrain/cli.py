"""Command line: assemble the sub-commands' parsers, dispatch, and turn errors into one line.

Each sub-command lives in `leantrain.commands` (`add_parser` + `run`); nothing here imports
torch, so `leantrain --help` and `leantrain COMMAND --help` start fast. A `LeantrainError` (bad
input) is printed as one line and exits with status 2; `--debug` shows its traceback too. Any
other exception keeps its traceback: it is a bug.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from . import __version__
from .commands import COMMANDS
from .errors import LeantrainError, one_line, shorten


def _module(name: str):
    return importlib.import_module(f"leantrain.commands.{name}")


def _message(exc: LeantrainError) -> str:
    """The message; for an error raised in a DataLoader worker, torch re-raises it with the
    worker's traceback as its text: its last line is the message."""
    text = str(exc)
    if "Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith("leantrain.") and ": " in last \
            else last
    return " ".join(text.split())  # one line, whatever a message built from others' holds


def _tell_torchrun(line: str) -> None:
    """Under `leantrain launch`, leave the error's line where torchrun's agent reads a failed
    rank's reason (its error file), so the launch report names it, not torch's boilerplate."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as handle:
                json.dump({"message": line, "timestamp": int(time.time())}, handle)
        except OSError:
            pass  # the report falls back to torch's text


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as leantrain's: one bounded line and exit 2 (argparse printed
    the whole usage block first, and echoed a bad value at any length)."""

    def error(self, message: str):
        self.exit(2, f"leantrain: error: {shorten(message, 240)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leantrain", description="Faster, smaller, cheaper PyTorch training, measured.")
    parser.add_argument("--version", action="version", version=f"leantrain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in dict.fromkeys(COMMANDS.values()):  # a module may add several sub-commands
        _module(name).add_parser(sub)
    for sub_parser in sub.choices.values():
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show tracebacks and debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The CLI. With no `argv` it is this process's command (argv from the command line):
    a budget then counts from the process's start, imports included, as a stopwatch does;
    an in-process call counts from the call."""
    from .measure.clock import now, process_age

    started = now() - (process_age() if argv is None else 0.0)
    args = build_parser().parse_args(argv)
    args.started = started
    try:
        from .commands.common import session

        with session(args.debug, own_process=argv is None, command=args.command) as dist:
            return _module(COMMANDS[args.command]).run(args, dist)
    except LeantrainError as exc:
        if args.debug:
            raise
        print(f"leantrain: error: {_message(exc)}", file=sys.stderr)
        _tell_torchrun(_message(exc))
        return getattr(exc, "exit_code", 2)  # 2: bad input; 128 + N: stopped by signal N
    except OSError as exc:
        if exc.errno != errno.ENOSPC or args.debug:
            _tell_torchrun(one_line(exc))
            raise
        # (stdout or a log on a full device: what was written before stays)
        print("leantrain: error: cannot write the output: no space left on the device",
              file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: its traceback follows; under launch, its line first
        _tell_torchrun(one_line(exc))
        raise
    except KeyboardInterrupt:
        print("leantrain: interrupted; a run with a checkpoint continues with --resume DIR",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
