"""Resolve "pkg.module:attr" strings (the --model and --data options) with clear errors."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from .errors import LeantrainError


def import_object(spec: str, what: str) -> Any:
    """Import `module:attr`; the current directory is importable, as with `python -m`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LeantrainError(f"{what} {spec!r} must look like 'package.module:function'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
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
