"""Resolve "pkg.module:attr" strings (the --model and --data options) with clear errors."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LeantrainError, one_line, shorten

OWN_BUILDERS = "leantrain.recipes."  # the modules that define leantrain's own model builders
def import_object(spec: str, what: str) -> Any:
    """Import `module:attr`; the current directory is importable, as with `python -m`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LeantrainError(f"{what} {spec!r} must look like 'package.module:function'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        with user_code(f"{what} {shorten(spec, 80)}: importing module {module_name!r}"):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise LeantrainError(
            f"{what} {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise LeantrainError(f"{what} {spec!r}: module {module_name!r} has no {attr!r}") from exc
    if not callable(obj):
        raise LeantrainError(f"{what} {spec!r} is not callable")
    return obj


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the user's code (a data or model function, a module it imports): its failure is
    one line naming `what` and the exception (`--debug` shows the user's own traceback), and
    a `sys.exit` inside it is a failure too, never the command's success."""
    try:
        yield
    except (LeantrainError, ModuleNotFoundError, KeyboardInterrupt):
        raise
    except SystemExit as exc:
        raise LeantrainError(f"{what} called sys.exit({shorten(exc.code, 40)}) instead of "
                             "returning; nothing was run") from exc
    except Exception as exc:
        raise LeantrainError(f"{what} raised {shorten(one_line(exc), 160)} (--debug shows "
                             "its traceback)") from exc


def call_user(spec: str, what: str) -> Any:
    """Import the user's `module:function` and call it, its failures one line each."""
    function = import_object(spec, what)
    with user_code(f"{what} {shorten(spec, 80)}"):
        return function()


def own_builder(spec: str) -> bool:
    """Whether `spec` names a model builder leantrain defines (a function in
    `leantrain.recipes`, by its own name): what a run folder's config may name without the
    user vouching for it. The name must resolve to a function whose `__module__` is the
    module named; an attribute path or a name a leantrain module imported (`os.abort`, as
    `leantrain.checkpoint:os.abort` once reached) never does."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.startswith(OWN_BUILDERS) or not attr.isidentifier():
        return False
    try:
        module = importlib.import_module(module_name)  # (leantrain's own: no other code runs)
    except Exception:
        return False
    found = vars(module).get(attr)
    return inspect.isfunction(found) and found.__module__ == module_name


def module_file(spec: str) -> str:
    """The file a "module:function" spec would import, found without importing it."""
    module_name = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    return found.origin if found is not None and found.origin else "not found on the path"
