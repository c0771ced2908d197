"""Atomic checkpoints, RNG capture and weights-only loading.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the old one, so a run killed at any instant (SIGKILL included) leaves either the previous or the
new checkpoint, never half of one. Loading uses `weights_only=True`: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LeantrainError

CHECKPOINT_NAME = "checkpoint.pt"


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temp files of writes that never finished (the process was killed)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` so that `path` is always complete."""
    _atomic_replace(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_replace(Path(path), lambda handle: handle.write(text.encode()))


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """RNG states are CPU byte tensors, wherever the checkpoint was loaded to (a resumed CUDA
    run loads straight onto the GPU: setting a state from there fails)."""
    state = _on_cpu(state)
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LeantrainError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file or a pickle that is not plain weights
        raise LeantrainError(f"checkpoint {path} cannot be loaded weights-only: {exc}") from exc
