"""A text corpus tokenized once into token shards, cached by its content and the tokenizer.

`data.tokenizer` names a local `tokenizer.json` (or a folder holding one, as `transformers`
saves them): the `tokenizers` library reads it as JSON, nothing in it runs as code. The
corpus is a text file, a folder of them (each file a document), a JSONL file whose
`data.text_field` holds each line's document, or a Parquet or Arrow table (as `datasets`
saves them) whose column `data.text_field` holds a document a row, read batch by batch;
documents are packed with the end-of-text token between them. Validation is held out by file
(a single file: its last `data.val_fraction` of bytes, or of rows), as for byte-level text.

Tokenization runs in parallel (the library's threads over batches of documents) and writes
`data.tokens`-style shards under the cache folder, keyed by the SHA-256 of the tokenizer file
and of every corpus file: a second run over the same corpus reads the shards and says so. Two
processes starting at once (the ranks of a launch) take a lock; the second finds the first's
shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import sha256_file
from ..env import cache_folder
from ..errors import LeantrainError, one_line, shorten
from .text import text_files
from .tokens import MANIFEST, TokenFolder, open_token_folder, write_token_folder

log = logging.getLogger(__name__)
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|eot_id|>")
CHUNK_BYTES = 4 << 20  # text handed to the tokenizer at once (cut at a line end)


def load_tokenizer(spec: str):
    """The tokenizer at `spec` (a tokenizer.json, or a folder holding one), with its
    vocabulary size and end-of-text id."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise LeantrainError("data.tokenizer needs the tokenizers library: pip install "
                             "tokenizers (or leantrain[data])") from exc
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LeantrainError(f"data.tokenizer: {shorten(str(path), 120)} is not a file; give a "
                             "tokenizer.json or a folder holding one")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise LeantrainError(f"data.tokenizer: {shorten(str(path), 120)} is not a tokenizer "
                             f"the tokenizers library reads: {one_line(exc)[:150]}") from exc
    eot = next((i for i in map(tokenizer.token_to_id, EOT_NAMES) if i is not None), None)
    if eot is None:
        raise LeantrainError(f"data.tokenizer: {shorten(str(path), 120)} has none of the "
                             f"end-of-text tokens {', '.join(EOT_NAMES)}, which separate "
                             "documents in the shards")
    return tokenizer, path, tokenizer.get_vocab_size(with_added_tokens=True), eot


TABLES = (".parquet", ".arrow")  # a document a row, its text in the column data.text_field
OWN_DOCUMENTS = (".jsonl", *TABLES)  # a document a line or row (a text file: the whole file)


def _documents(path: Path, text_field: str) -> Iterator[tuple[str, int, bool]]:
    """(text, position, whether a document ends with it): a text file in chunks cut at line
    ends (its document ends with the file), a .jsonl file one document a line (positions in
    bytes); a .parquet or .arrow table one document a row (positions in rows)."""
    if path.suffix in TABLES:
        yield from _rows(path, text_field)
        return
    jsonl = path.suffix == ".jsonl"
    with path.open("rb") as f:
        position, number = 0, 0
        while True:
            raw = f.readline() if jsonl else f.read(CHUNK_BYTES) + f.readline()
            if not raw:
                return
            number += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise LeantrainError(f"{path}: not UTF-8 text at byte "
                                     f"{position + exc.start:,}") from exc
            if jsonl:
                if not text.strip():
                    position += len(raw)
                    continue
                text = _field_of(text, text_field, path, number)
            yield text, position, jsonl
            position += len(raw)


def _table_batches(path: Path, column: str) -> Iterator[Any]:
    """The column's record batches, read from disk as they come (Parquet row groups; an Arrow
    file, as `datasets` saves them, memory-mapped)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise LeantrainError(f"{path}: reading {path.suffix} tables needs pyarrow: pip install "
                             "pyarrow (or leantrain[data])") from exc
    try:
        if path.suffix == ".parquet":
            source = pq.ParquetFile(path)
            if column not in source.schema_arrow.names:
                raise _missing_column(path, column, source.schema_arrow.names)
            yield from source.iter_batches(columns=[column], batch_size=1024)
            return
        mapped = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(mapped)
        except pa.ArrowInvalid:
            mapped.seek(0)
            file = pa.ipc.open_file(mapped)
            reader = (file.get_batch(i) for i in range(file.num_record_batches))
            names = file.schema.names
        else:
            names = reader.schema.names
        if column not in names:
            raise _missing_column(path, column, names)
        for batch in reader:
            yield batch.select([column])
    except (OSError, pa.ArrowException) as exc:
        raise LeantrainError(f"{path}: not a readable {path.suffix[1:]} table: "
                             f"{one_line(exc)[:120]}") from exc


def _missing_column(path: Path, column: str, names: list[str]) -> LeantrainError:
    return LeantrainError(f"{path}: no text column '{shorten(column, 40)}' (its columns: "
                          f"{shorten(', '.join(names), 80)}); set data.text_field")


def _rows(path: Path, column: str) -> Iterator[tuple[str, int, bool]]:
    row = 0
    for batch in _table_batches(path, column):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise LeantrainError(f"{path} row {row}: '{shorten(column, 40)}' holds "
                                     f"{type(text).__name__}, not text")
            yield text, row, True
            row += 1


def _extent(path: Path, column: str) -> int:
    """How far positions run in the file: bytes, or a table's rows."""
    if path.suffix not in TABLES:
        return path.stat().st_size
    return sum(batch.num_rows for batch in _table_batches(path, column))


def _field_of(line: str, field: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise LeantrainError(f"{path} line {number}: not JSON ({one_line(exc)[:80]})") from exc
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise LeantrainError(f"{path} line {number}: no text field '{shorten(field, 40)}' (set "
                             "data.text_field to the key that holds the text)")
    return value


class _Encoder:
    """Documents to token ids in batches, end-of-text after each document."""

    def __init__(self, tokenizer, eot: int):
        self.tokenizer, self.eot, self.pending, self.size = tokenizer, eot, [], 0

    def add(self, text: str, ends: bool) -> Iterator[np.ndarray]:
        self.pending.append((text, ends))
        self.size += len(text)
        if self.size >= CHUNK_BYTES:
            yield from self.flush()

    def flush(self) -> Iterator[np.ndarray]:
        if not self.pending:
            return
        encoded = self.tokenizer.encode_batch([t for t, _ in self.pending],
                                              add_special_tokens=False)
        for (_, ends), found in zip(self.pending, encoded, strict=True):
            yield np.asarray(found.ids + [self.eot] if ends else found.ids, dtype=np.int64)
        self.pending, self.size = [], 0


def _split_ids(files: list[Path], val_fraction: float, seed: int, tokenizer, eot: int,
               text_field: str) -> dict[str, Iterator[np.ndarray]]:
    if len(files) == 1:
        path = files[0]
        cut = int(_extent(path, text_field) * (1 - val_fraction))
        return {"train": _ids([path], tokenizer, eot, text_field, lambda p: p < cut),
                "val": _ids([path], tokenizer, eot, text_field, lambda p: p >= cut)}
    order = files[:]
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return {"train": _ids(order[n_val:], tokenizer, eot, text_field),
            "val": _ids(order[:n_val], tokenizer, eot, text_field)}


def _ids(files: list[Path], tokenizer, eot: int, text_field: str,
         keep=lambda position: True) -> Iterator[np.ndarray]:
    encoder = _Encoder(tokenizer, eot)
    for path in files:
        kept = False
        for text, position, ends in _documents(path, text_field):
            if keep(position):
                kept = True
                yield from encoder.add(text, ends)
        if kept and path.suffix not in OWN_DOCUMENTS:  # a text file is one document
            yield from encoder.add("", True)
    yield from encoder.flush()


def tokenized(source: str, tokenizer_spec: str, val_fraction: float, seed: int = 0,
              text_field: str = "text") -> TokenFolder:
    """The corpus at `source` as token shards (made now, or found in the cache)."""
    tokenizer, path, vocab, eot = load_tokenizer(tokenizer_spec)
    files = text_files(source)
    digest = hashlib.sha256(json.dumps([sha256_file(path), val_fraction, seed,
                                        text_field]).encode())
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}".encode())
    folder = cache_folder() / "tokens" / digest.hexdigest()[:32]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_suffix(".lock")):
        if (folder / MANIFEST).is_file():
            log.info("data: the tokenized shards of this corpus and tokenizer are cached at %s "
                     "(no tokenization)", folder)
            return open_token_folder(folder)
        shutil.rmtree(folder, ignore_errors=True)  # what a killed tokenization left
        log.info("data: tokenizing %d file(s) with %s into %s", len(files), path, folder)
        made = write_token_folder(folder, _split_ids(files, val_fraction, seed, tokenizer, eot,
                                                     text_field), vocab, eot)
        log.info("data: %s", made.describe())
        return made


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
