"""Atomic checkpoints, RNG capture and weights-only loading.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the old one, so a run killed at any instant (SIGKILL included) leaves either the previous or the
new checkpoint, never half of one. Loading uses `weights_only=True`: a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LeantrainError, first_line
from .quiet import quiet_imports

CHECKPOINT_NAME = "checkpoint.pt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def require_recorded_hash(path: Path) -> None:
    """Refuse a checkpoint of leantrain's own whose SHA-256 is not recorded beside it: every
    file leantrain writes has one (written before the rename), so a missing or empty one means
    the file was copied or changed without it, and a flipped bit would load unnoticed."""
    if not _recorded(path):
        raise LeantrainError(f"{path} has no SHA-256 recorded beside it "
                             f"({_checksum_file(path).name} is missing or empty), so it cannot "
                             "be checked; pass --no-verify to resume from it anyway")


def _recorded(path: Path) -> list[str]:
    try:  # (bytes that are not text are no hash: the file then differs from the record)
        return _checksum_file(path).read_bytes().decode("ascii", errors="replace").split()
    except OSError:
        return []


def _atomic_replace(path: Path, write, checksum: bool = False) -> None:
    """Write to a temp file, fsync, rename over `path`. With `checksum`, the file's SHA-256 is
    recorded in `path.sha256` before the rename, beside the previous file's (a kill between the
    two leaves the old file, whose hash is still listed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LeantrainError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as any file the user creates (mkstemp makes 0600)
        if checksum:
            hashes = [sha256_file(Path(tmp))] + (_recorded(path)[:2] if path.is_file() else [])
            _atomic_replace(_checksum_file(path), lambda h: h.write(" ".join(hashes).encode()))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # a full disk, a folder made read-only mid-run
        Path(tmp).unlink(missing_ok=True)  # nothing half-written
        found = _os_error(exc)
        if found is None:
            raise
        why = "no space left on the device" if found.errno == errno.ENOSPC else found.strerror
        raise LeantrainError(f"cannot write {path}: {why}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: torch.save's zip writer turns a full disk's ENOSPC into a
    RuntimeError ("unexpected pos") raised while handling it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temp files and folders of writes that never finished (the process was
    killed)."""
    stale = list(Path(folder).glob(".*.tmp"))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def atomic_folder(path: str | Path, write) -> None:
    """`write(folder)` into a temp folder beside `path`, then rename it to `path` (replacing
    an older one), so that `path` is always a complete folder or none."""
    path = Path(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise LeantrainError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        write(tmp)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        why = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror
        raise LeantrainError(f"cannot write {path}: {why}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` so that `path` is always complete, its SHA-256 beside it."""
    _atomic_replace(Path(path), lambda handle: torch.save(obj, handle), checksum=True)


def atomic_export(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """torch.export.save `program` to `path` so that `path` is always complete."""
    _atomic_replace(Path(path), lambda handle: torch.export.save(program, handle))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_replace(Path(path), lambda handle: handle.write(data))


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


def seed_everything(seed: int) -> None:
    """Seed every RNG `capture_rng` captures (Python's, NumPy's, torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _trusted_tensor_types() -> list[type]:
    """Tensor subclasses a checkpoint of leantrain's own may hold besides plain tensors: the
    quantized moments of torchao's low-bit optimizers (plan.optimizer_states). Only types:
    the weights-only unpickler still runs no code of the file's choosing."""
    try:
        with quiet_imports():
            from torchao.optim.subclass_4bit import OptimState4bit
            from torchao.optim.subclass_8bit import OptimState8bit
    except Exception:  # no torchao (or one whose import fails, a warning made an error):
        return []  # no such states were written with it here either
    return [OptimState4bit, OptimState8bit]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights-only, after checking the SHA-256 recorded when leantrain wrote the file
    (files from elsewhere have none and are loaded as they are)."""
    path = Path(path)
    if not path.is_file():
        raise LeantrainError(f"checkpoint not found: {path}")
    recorded = _recorded(path)
    if recorded and sha256_file(path) not in recorded:
        raise LeantrainError(f"{path} is corrupt: its SHA-256 differs from the one recorded "
                             f"when it was written ({_checksum_file(path).name})")
    try:
        with torch.serialization.safe_globals(_trusted_tensor_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # a pickle that is not plain weights
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise LeantrainError(f"{path} holds Python objects besides tensors{what}; leantrain "
                             "loads weights only, so that a file cannot run code") from exc
    except Exception as exc:  # a truncated or foreign file
        first = first_line(exc) or type(exc).__name__
        raise LeantrainError(f"{path} cannot be loaded as a checkpoint: {first}") from exc
