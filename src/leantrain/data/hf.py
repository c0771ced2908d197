"""Hugging Face `datasets` objects as they come: a `Dataset` (Arrow, memory-mapped) or an
`IterableDataset` (a stream), returned by a data function or given to `fit()`.

Nothing here imports `datasets`: an object is recognised by its type's module, so a user who
never installed the library pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

ROWS_AT_ONCE = 256  # rows read from Arrow per step of a stream


def is_hf(data: Any) -> bool:
    return type(data).__module__.split(".")[0] == "datasets"


def torch_formatted(data: Any, collate_fn: Any = None) -> Any:
    """An unformatted Hugging Face dataset (rows of Python lists, which the default collate
    transposes) as torch tensors; a format the user chose, or a collate_fn of theirs that
    expects Python rows, is kept."""
    if not is_hf(data) or collate_fn is not None or not hasattr(data, "with_format"):
        return data
    chosen = data.format.get("type") if isinstance(getattr(data, "format", None), dict) \
        else getattr(getattr(data, "_formatting", None), "format_type", None)
    return data.with_format("torch") if chosen is None else data


def whole_stream(stream: Any) -> Iterator[Any]:
    """Every row of the stream, wherever it is read. A Hugging Face IterableDataset iterated
    in a DataLoader worker reads only that worker's shards (its own split), which would drop
    the rest of leantrain's: its `iter(batch_size)` reads them all, in the same order."""
    if not (is_hf(stream) and hasattr(stream, "iter")):
        yield from stream
        return
    for rows in stream.iter(batch_size=ROWS_AT_ONCE):
        count = len(next(iter(rows.values()))) if rows else 0
        for i in range(count):
            yield {key: values[i] for key, values in rows.items()}
