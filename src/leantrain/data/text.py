"""Byte-level text for language models: files split into train and validation *by file*.

A sample is `context` bytes and the same bytes shifted by one: the model predicts every next
byte (256 classes). Splitting by file rather than by position keeps near-duplicate lines of
one file from landing on both sides. The default corpus is one every Python machine has:
the standard library's own source files.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..config import STDLIB
from ..errors import LeantrainError

VOCAB = 256  # bytes


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (site-packages and test suites left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "test" not in p.parts
                  and "tests" not in p.parts)


def text_files(source: str) -> list[Path]:
    if source == STDLIB:
        return stdlib_sources()
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if files:
            return files
        raise LeantrainError(f"text folder {path} holds no files")
    raise LeantrainError(f"text path not found: {source}")


def _windows(data: bytes, context: int) -> TensorDataset:
    """Non-overlapping (context + 1)-byte chunks as (inputs, next-byte targets)."""
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = (len(whole) - 1) // context
    if n < 1:
        raise LeantrainError(f"{len(whole)} bytes of text make no sample of {context + 1} "
                             "bytes; lower data.context or add text")
    x = whole[:n * context].view(n, context)
    y = whole[1:n * context + 1].view(n, context)
    return TensorDataset(x, y)


def load_text(source: str, context: int, val_fraction: float, max_bytes: int,
              seed: int = 0) -> tuple[TensorDataset, TensorDataset, str]:
    """(train, val, description); at most `max_bytes` of train text and a tenth of it for val.

    A single file is split by position instead (there is no other file to hold out).
    """
    files = text_files(source)
    if len(files) == 1:
        data = files[0].read_bytes()[: int(max_bytes * 1.1)]
        cut = int(len(data) * (1 - val_fraction))
        train, val = data[:cut], data[cut:]
        how = "one file, split by position"
    else:
        order = files[:]
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(order) * val_fraction))
        train = _read(order[n_val:], max_bytes)
        val = _read(order[:n_val], max(max_bytes // 10, context + 1))
        how = f"{len(files)} files, {n_val} held out for validation"
    name = "Python standard library sources" if source == STDLIB else source
    description = (f"text: {name} ({how}); {len(train):,} train / {len(val):,} val bytes, "
                   f"context {context}")
    return _windows(train, context), _windows(val, context), description


def _read(files: list[Path], limit: int) -> bytes:
    chunks, total = [], 0
    for path in files:
        if total >= limit:
            break
        data = path.read_bytes()[: limit - total]
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)
