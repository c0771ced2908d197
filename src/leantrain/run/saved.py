"""A training checkpoint checked as data before any of it is applied.

A checkpoint's SHA-256 proves only that the file is the one written beside its hash, not that
leantrain wrote it: a file crafted with a valid hash reached torch's loaders, which failed with
a traceback (a wrong RNG state, a scheduler entry of another type, epoch sums of another
length) or, for an optimizer state of another shape than its parameter, corrupted memory and
aborted the process. Every entry is compared with what this run would write itself (keys,
types, shapes, ranges) and a difference is one line naming the entry; weights that are not
finite are refused too (leantrain writes finite checkpoints only, so such a file was altered).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import capture_rng
from ..data.batching import batches_per_epoch
from ..errors import LeantrainError, shorten
from .progress import Progress

if TYPE_CHECKING:
    from .plan import Run
    from .state import TrainState

COUNTS = ("epoch", "batch", "step", "samples")  # Progress fields that count from 0
SECONDS = ("step_seconds", "train_seconds", "compile_seconds")


def check(saved: dict[str, Any], state: TrainState, run: Run, path: Path,
          weights: bool = True) -> None:
    """Refuse, in one line naming the entry, a checkpoint this run would not have written.
    `weights`: it holds the model and optimizer (a sharded one's are checked by DCP against
    its metadata, and by the fingerprint's names and shapes)."""
    progress = saved["progress"]
    _progress(progress, batches_per_epoch(run.train_loader), path)
    if progress.get("finished") and not isinstance(saved.get("summary"), dict):
        raise LeantrainError(f"{path}: marked finished but holds no summary; it was not "
                             "written by a finished run")
    _per_rank(saved, path)
    if weights:
        _model(saved["model"], run, path)
        _optimizer(saved["optimizer"], state.optimizer, path)
    _scheduler(saved["scheduler"], state.scheduler.state_dict(), path)


def _bad(path: Path, entry: str, why: str) -> LeantrainError:
    return LeantrainError(f"{path}: its {entry} {why}: not this run's checkpoint (nothing "
                          "applied)")


def _progress(progress: dict[str, Any], batches: int | None, path: Path) -> None:
    known = {f.name for f in fields(Progress)}
    for key in progress:
        if key not in known:
            raise _bad(path, "progress", f"has an unknown entry {shorten(key, 40)!r}")
    for key, value in progress.items():
        ok = True
        if key in COUNTS or key == "logged":
            ok = (value is None and key == "logged") or (
                type(value) is int and value >= 0)
        elif key == "micro_split":
            ok = type(value) is int and value >= 1
        elif key in SECONDS or key == "time_to_target" or key.startswith("val_"):
            ok = (value is None and key not in SECONDS) or (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and (value >= 0 or key.startswith("val_")))
        elif key == "stop_reason":
            ok = value is None or isinstance(value, str)
        elif key == "finished":
            ok = isinstance(value, bool)
        if not ok:
            raise _bad(path, f"progress.{key}", f"is {shorten(repr(value), 40)}")
    if batches is not None and progress.get("batch", 0) > batches:  # (a stream: unknown)
        raise _bad(path, "progress.batch", f"is {progress['batch']:,}, past the epoch's "
                                           f"{batches:,} batches")


def _per_rank(saved: dict[str, Any], path: Path) -> None:
    """RNG states and partial epoch sums, one per rank that wrote the checkpoint (as many as
    there are now, or not: a resume may reshard), each as this process would save."""
    rng = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    ranks = len(rng)
    if not 1 <= ranks <= 1 << 16:
        raise _bad(path, "rng", f"holds {ranks} states, not one per process")
    mine = capture_rng()
    for state in rng:
        if not isinstance(state, dict) or set(state) - {"cuda"} != set(mine) - {"cuda"}:
            raise _bad(path, "rng", "holds other generators than a run's")
        for key, value in mine.items():
            if key in state and not _same_kind(state[key], value):
                raise _bad(path, f"rng.{key}", "is not a generator state of this kind")
    sums = saved["epoch_sums"]
    sums = sums if sums and isinstance(sums[0], list) else [sums]  # (one process: one list)
    if len(sums) != ranks or any(
            not isinstance(s, list) or len(s) != 3 or not all(
                isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_complex()
                and bool(torch.isfinite(t.float())) for t in s) for s in sums):
        raise _bad(path, "epoch_sums", "are not three finite numbers per rank")


def _same_kind(saved: Any, mine: Any) -> bool:
    """Alike in structure: tensors of the same dtype and shape, sequences of the same length
    and kinds, scalars of the same type."""
    if isinstance(mine, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.dtype == mine.dtype \
            and saved.shape == mine.shape
    if isinstance(mine, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(mine) and all(
            _same_kind(a, b) for a, b in zip(saved, mine, strict=True))
    return type(saved) is type(mine)


def _model(weights: dict[str, Any], run: Run, path: Path) -> None:
    expected = {k: v for k, v in run.model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        name, what = (missing[0], "lacks") if missing else (extra[0], "has an unknown")
        raise _bad(path, "model", f"{what} entry {shorten(name, 60)!r}")
    for name, tensor in weights.items():
        want = expected[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(want.shape) \
                or tensor.is_floating_point() != want.is_floating_point():
            raise _bad(path, f"model entry {shorten(name, 60)!r}",
                       f"is not a tensor of shape {tuple(want.shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LeantrainError(f"{path}: model entry {shorten(name, 60)!r} holds NaN or inf; "
                                 "leantrain writes finite checkpoints only, so this one was "
                                 "altered: it cannot be resumed")


def _optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Groups and per-parameter states as this optimizer has them: a state tensor of another
    shape than its parameter made a fused kernel write out of bounds."""
    groups, states = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(states, dict):
        raise _bad(path, "optimizer", "lacks param_groups or state")
    mine = getattr(optimizer, "param_groups", None)
    if not isinstance(mine, list) or len(mine) != len(groups):
        raise _bad(path, "optimizer", f"has {len(groups)} parameter groups, this run "
                                      f"{len(mine) if isinstance(mine, list) else '?'}")
    params = {}
    for group, own in zip(groups, mine, strict=True):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(own["params"]):
            raise _bad(path, "optimizer", "groups hold other parameters than this run's")
        params.update(zip(ids, own["params"], strict=True))
    for key, values in states.items():
        if key not in params or not isinstance(values, dict):
            raise _bad(path, "optimizer state", f"names a parameter {shorten(key, 20)!r} "
                                                "this run does not have")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 \
                    and tuple(value.shape) != tuple(params[key].shape):
                raise _bad(path, f"optimizer state {name!r}", "has another shape than its "
                                                              "parameter")


def _scheduler(saved: dict[str, Any], mine: dict[str, Any], path: Path) -> None:
    """The schedule's own entries, of the types it keeps (its load sets them as attributes,
    and a string for a step count failed only at the next step)."""
    for key, value in saved.items():
        if key not in mine:
            raise _bad(path, "scheduler", f"has an unknown entry {shorten(key, 40)!r}")
        if not _same_kind(value, mine[key]) and not (
                isinstance(mine[key], (int, float)) and isinstance(value, (int, float))
                and not isinstance(value, bool)):
            raise _bad(path, f"scheduler.{key}", f"is {shorten(repr(value), 40)}")
