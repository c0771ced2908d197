"""Token shards: a corpus as token ids in `.npy` files, read as fixed windows without loading it.

A token folder holds `tokens.json` (the manifest: vocabulary size, end-of-text id, dtype, and
each split's shards with their token counts) and the shards it names, one-dimensional arrays of
a compact unsigned dtype (uint16 up to 65,536 ids, else uint32). A sample is `context + 1`
consecutive tokens of one shard (inputs, and the same shifted by one as targets), windows
side by side, each shard's tail dropped. Windows are read with `os.pread`: nothing is mapped
into the process, so its memory does not grow with the corpus (a memory map's touched pages
count in its RSS), and loader workers share the open files safely (pread has no file offset).
The manifest is written last: a folder without it is not a finished one. Each shard's entry
may give its largest id (`max_id`, which leantrain writes): an id past the vocabulary is then
refused before training; otherwise when its window is read.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checkpoint import atomic_write_text
from ..errors import LeantrainError, one_line, shorten

MANIFEST = "tokens.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class Shard:
    path: Path
    offset: int  # bytes before the first token (the .npy header)
    tokens: int
    dtype: np.dtype

    def read(self, start: int, count: int) -> np.ndarray:
        size = count * self.dtype.itemsize
        data = os.pread(_descriptor(self.path), size, self.offset + start * self.dtype.itemsize)
        if len(data) != size:
            raise LeantrainError(f"token shard {self.path} is truncated: it ends before token "
                                 f"{start + len(data) // self.dtype.itemsize:,} of "
                                 f"{self.tokens:,}")
        return np.frombuffer(data, dtype=self.dtype)


_open: dict[tuple[int, Path], int] = {}  # (process, shard) -> file descriptor


def _descriptor(path: Path) -> int:
    key = (os.getpid(), path)  # a forked worker opens its own (its parent's may close)
    if key not in _open:
        _open[key] = os.open(path, os.O_RDONLY)
    return _open[key]


@dataclass(frozen=True)
class TokenFolder:
    folder: Path
    vocab_size: int
    eot: int | None
    splits: dict[str, list[Shard]]

    def windows(self, split: str, context: int) -> TokenWindows:
        return TokenWindows(self.splits[split], context, self.vocab_size)

    def describe(self) -> str:
        counts = {s: sum(shard.tokens for shard in shards) for s, shards in self.splits.items()}
        return (f"token shards {self.folder}: {counts['train']:,} train / {counts['val']:,} val "
                f"tokens, vocabulary {self.vocab_size:,}")


def is_token_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def open_token_folder(folder: Path) -> TokenFolder:
    """The manifest and its shards checked (names, dtypes, lengths, sizes on disk: headers
    only, nothing read), one line naming the file otherwise."""
    where = folder / MANIFEST
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LeantrainError(f"{where} cannot be read as JSON: {one_line(exc)}") from exc
    vocab, eot = _field(manifest, "vocab_size", int, where), manifest.get("eot")
    if vocab < 1 or (eot is not None and (type(eot) is not int or not 0 <= eot < vocab)):
        raise LeantrainError(f"{where}: vocab_size must be >= 1 and eot an id below it, got "
                             f"{shorten(repr(vocab), 40)} and {shorten(repr(eot), 40)}")
    dtype = token_dtype(vocab)
    listed = _field(manifest, "shards", dict, where)
    splits = {}
    for split in SPLITS:
        entries = listed.get(split)
        if not isinstance(entries, list) or not entries:
            raise LeantrainError(f"{where}: shards.{split} must list at least one shard")
        splits[split] = [_shard(folder, entry, dtype, vocab, where) for entry in entries]
    return TokenFolder(folder, vocab, eot, splits)


def _field(manifest: Any, key: str, kind: type, where: Path) -> Any:
    value = manifest.get(key) if isinstance(manifest, dict) else None
    if type(value) is not kind:
        raise LeantrainError(f"{where}: '{key}' must be a {kind.__name__}, got "
                             f"{shorten(repr(value), 60)}")
    return value


def _shard(folder: Path, entry: Any, dtype: np.dtype, vocab: int, where: Path) -> Shard:
    name = entry.get("file") if isinstance(entry, dict) else None
    tokens = entry.get("tokens") if isinstance(entry, dict) else None
    top = entry.get("max_id") if isinstance(entry, dict) else None
    if type(top) is int and top >= vocab:  # (written by leantrain: known before training)
        raise LeantrainError(f"token shard {folder / str(name)} holds ids up to {top}, at or "
                             f"above the vocabulary's {vocab:,} ({where})")
    if not isinstance(name, str) or "/" in name or name.startswith(".") or type(tokens) is not int:
        raise LeantrainError(f"{where}: a shard entry is {{'file': NAME, 'tokens': COUNT}} with "
                             f"a file name in the folder, got {shorten(repr(entry), 80)}")
    path = folder / name
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, found = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise LeantrainError(f"token shard {path} cannot be read as .npy: "
                             f"{one_line(exc)}") from exc
    if found != dtype or len(shape) != 1 or shape[0] != tokens:
        raise LeantrainError(f"token shard {path} holds {found} of shape {shape}; the manifest "
                             f"says {tokens:,} tokens of {dtype}")
    size = path.stat().st_size
    if size < offset + tokens * dtype.itemsize:
        raise LeantrainError(f"token shard {path} is truncated: {size:,} bytes, "
                             f"{offset + tokens * dtype.itemsize:,} expected")
    return Shard(path, offset, tokens, dtype)


class TokenWindows(Dataset):
    """(inputs, targets) windows of `context` tokens over the shards, read on demand."""

    def __init__(self, shards: list[Shard], context: int, vocab_size: int):
        self.shards, self.context, self.vocab_size = shards, context, vocab_size
        per_shard = [max(0, (s.tokens - 1) // context) for s in shards]
        self.ends = np.cumsum(per_shard).tolist()
        if not self.ends or self.ends[-1] == 0:
            raise LeantrainError(f"the token shards ({shards[0].path.parent}) make no window of "
                                 f"{context + 1} tokens; lower data.context")

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        which = bisect.bisect_right(self.ends, index)
        shard = self.shards[which]
        start = (index - (self.ends[which - 1] if which else 0)) * self.context
        window = torch.from_numpy(shard.read(start, self.context + 1).astype(np.int64))
        top = int(window.max())
        if top >= self.vocab_size:
            at = start + int((window >= self.vocab_size).nonzero()[0])
            raise LeantrainError(f"token shard {shard.path} holds id {top} at token {at:,}, at "
                                 f"or above the vocabulary's {self.vocab_size:,}")
        return window[:-1], window[1:]


def write_token_folder(folder: Path, splits: dict[str, Iterable[np.ndarray]], vocab_size: int,
                       eot: int | None, shard_tokens: int = 100_000_000) -> TokenFolder:
    """Shards of at most `shard_tokens` from each split's arrays of ids, then the manifest
    (each shard whole on disk before it is named: a temp name, then renamed)."""
    dtype = token_dtype(vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    listed: dict[str, list[dict[str, Any]]] = {}
    for split, arrays in splits.items():
        listed[split] = []
        pending: list[np.ndarray] = []
        count = 0
        for ids in arrays:
            ids = np.asarray(ids)
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):  # (a cast would wrap)
                raise LeantrainError(f"token ids for the {split} split run from {ids.min()} to "
                                     f"{ids.max()}; a vocabulary of {vocab_size:,} takes 0.."
                                     f"{vocab_size - 1}")
            pending.append(ids.astype(dtype, copy=False))
            count += len(ids)
            while count >= shard_tokens:
                whole = np.concatenate(pending)
                _write_shard(folder, split, listed[split], whole[:shard_tokens])
                pending, count = [whole[shard_tokens:]], count - shard_tokens
        if count or not listed[split]:
            _write_shard(folder, split, listed[split],
                         np.concatenate(pending) if pending else np.zeros(0, dtype))
    manifest = {"vocab_size": vocab_size, "eot": eot, "dtype": str(dtype), "shards": listed}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return open_token_folder(folder)


def _write_shard(folder: Path, split: str, listed: list[dict[str, Any]],
                 ids: np.ndarray) -> None:
    name = f"{split}-{len(listed):05d}.npy"
    temporary = folder / f".{name}.tmp"
    with temporary.open("wb") as f:
        np.save(f, ids, allow_pickle=False)
    os.replace(temporary, folder / name)
    listed.append({"file": name, "tokens": int(len(ids)),
                   "max_id": int(ids.max()) if len(ids) else 0})
