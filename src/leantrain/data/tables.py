"""A labelled text table for classification: `--data corpus.jsonl|.parquet|.arrow`.

The `datasets` library reads the file into its Arrow cache (memory-mapped, not held in RAM)
and tokenizes it once with `.map` (cached by its fingerprint: a second run reads the result).
Each row's `data.text_field` becomes `input_ids` and `attention_mask` of at most
`data.max_tokens` tokens, its `data.label_column` the label: class indices, or strings whose
sorted set are the classes. The text goes through `data.tokenizer` (a local tokenizer.json),
else byte by byte (ids 0..255). Validation is `data.val_fraction` of the rows, drawn with a
fixed seed. Batches are padded to their longest row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import sha256_file
from ..config import DataConfig
from ..env import cache_folder
from ..errors import LeantrainError, one_line, shorten
from .tokenize import load_tokenizer

TABLE_SUFFIXES = {".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
SPLIT_SEED = 0


def is_table(path: Path) -> bool:
    return path.is_file() and path.suffix in TABLE_SUFFIXES


def _load(path: Path):
    try:
        import datasets
    except ImportError as exc:
        raise LeantrainError(f"--data {path.name}: reading {path.suffix} tables needs the "
                             "datasets library: pip install leantrain[data]") from exc
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path),
                                     split="train",
                                     cache_dir=str(cache_folder() / "datasets"))
    except Exception as exc:  # the library's own errors name the file and the row
        raise LeantrainError(f"--data {path}: not a readable {path.suffix[1:]} table: "
                             f"{shorten(one_line(exc), 160)}") from exc


def _labels(table, column: str, path: Path):
    """The table with integer labels (strings mapped to their sorted set) and the classes."""
    kind = table.features[column]
    if getattr(kind, "names", None):  # already a ClassLabel
        return table, len(kind.names)
    dtype = getattr(kind, "dtype", "")
    if dtype == "string":
        table = table.class_encode_column(column)
        return table, len(table.features[column].names)
    if not dtype.startswith("int"):
        raise LeantrainError(f"{path}: label column '{column}' holds {dtype or kind}; labels "
                             "are class indices or strings")
    values = table.unique(column)
    if min(values) < 0:
        raise LeantrainError(f"{path}: label column '{column}' holds {min(values)}; class "
                             "indices start at 0")
    return table, max(values) + 1


def _encoder(spec: str | None, max_tokens: int):
    if spec is None:
        return lambda texts: [list(t.encode("utf-8")[:max_tokens]) for t in texts], 0
    tokenizer, _, _, _ = load_tokenizer(spec)
    pad = next((tokenizer.token_to_id(t) for t in ("<pad>", "[PAD]", "<|pad|>")
                if tokenizer.token_to_id(t) is not None), 0)

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids[:max_tokens] for e in tokenizer.encode_batch(texts)]

    return encode, pad


class PadToLongest:
    """Batches of token rows padded to their longest (attention_mask 0 over the padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            mask[i, :n] = 1
        labels = torch.as_tensor([int(r["labels"]) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def labelled_table(path: Path, cfg: DataConfig) -> tuple[Any, Any, int, PadToLongest, str]:
    """(train, val, classes, collate_fn, description)."""
    table = _load(path)
    for column, key in ((cfg.text_field, "data.text_field"), (cfg.label_column,
                                                              "data.label_column")):
        if column not in table.column_names:
            raise LeantrainError(f"{path}: no column '{shorten(column, 40)}' ({key}); its "
                                 f"columns: {shorten(', '.join(table.column_names), 100)}")
    if len(table) < 2:
        raise LeantrainError(f"{path}: {len(table)} row(s); a training and a validation set "
                             "need at least 2")
    table, classes = _labels(table, cfg.label_column, path)
    encode, pad = _encoder(cfg.tokenizer, cfg.max_tokens)
    text, label = cfg.text_field, cfg.label_column

    def tokenized(rows: dict[str, list]) -> dict[str, list]:
        bad = next((i for i, t in enumerate(rows[text]) if not isinstance(t, str) or not t),
                   None)
        if bad is not None:
            raise LeantrainError(f"{path}: a row's '{text}' is {rows[text][bad]!r:.40}, not "
                                 "text")
        return {"input_ids": encode(rows[text]), "labels": rows[label]}

    # the map's cache is keyed by what it depends on (the library cannot hash a tokenizer)
    tokenizer = cfg.tokenizer and load_tokenizer(cfg.tokenizer)[1]
    key = hashlib.sha256(json.dumps([sha256_file(path), tokenizer and sha256_file(tokenizer),
                                     cfg.max_tokens, text, label]).encode()).hexdigest()[:32]
    table = table.map(tokenized, batched=True, remove_columns=table.column_names,
                      new_fingerprint=key)
    split = table.train_test_split(test_size=cfg.val_fraction, seed=SPLIT_SEED)
    how = f"tokenizer {cfg.tokenizer}" if cfg.tokenizer else "bytes"
    return (split["train"], split["test"], classes, PadToLongest(pad),
            f"table {path}: {len(split['train']):,} train / {len(split['test']):,} val rows, "
            f"{classes} classes, {how}, at most {cfg.max_tokens} tokens a row")
