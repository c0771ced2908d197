"""Which loader a dataset gets, and the epoch's batches with the last one marked.

Tensor-backed datasets are batched by indexing (`InMemoryBatches`), other map-style datasets
through a DataLoader (`DataLoaderBatches`), and streams (no length) by readers that split them
across ranks and workers (`StreamBatches`). The training loop asks only for an epoch's batches
and which of them is the last (a gradient-accumulation window closes there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import LeantrainError
from .loaders import Batch, DataLoaderBatches, InMemoryBatches, LoaderOptions, Shard, tensors_of
from .streams import StreamBatches, first_samples, is_stream

Loader = InMemoryBatches | DataLoaderBatches | StreamBatches


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                device: torch.device | None = None, options: LoaderOptions | None = None,
                in_memory: bool = True, shard: Shard = (0, 1), drop_last: bool = False,
                collate_fn: Callable[[list], Any] | None = None) -> Loader:
    """Batched indexing for a tensor-backed dataset unless `in_memory` is False or a
    `collate_fn` is given, readers for a stream (in its own order: `shuffle` is for map-style
    data), else a DataLoader. `drop_last` drops a short last batch (it always drops under
    several ranks)."""
    if is_stream(dataset):
        return StreamBatches(dataset, batch_size, seed, options, device, shard, drop_last,
                             collate_fn)
    tensors = tensors_of(dataset)
    if tensors is not None and in_memory and collate_fn is None:
        named = tensors if isinstance(tensors, dict) else None
        return InMemoryBatches(*(() if named else tensors), batch_size=batch_size,
                               shuffle=shuffle, seed=seed, device=device, shard=shard,
                               drop_last=drop_last, named=named)
    return DataLoaderBatches(dataset, batch_size, shuffle, seed, options, device, shard,
                             drop_last, collate_fn)


def batches_per_epoch(loader: Loader) -> int | None:
    """This rank's batches in an epoch; None for a stream (its epoch ends where it does)."""
    return None if isinstance(loader, StreamBatches) else len(loader)


def marking_last(loader: Loader, epoch: int = 0, start: int = 0
                 ) -> Iterator[tuple[Batch, bool]]:
    """(batch, whether it ends the epoch) from batch `start` on. A stream's last batch is
    known by reading one ahead (its readers draw no random number of the training's); a sized
    loader's by counting, so fetching batch k + 1 never runs before step k (a dataset that
    augments with torch's random numbers in the training process draws them in step order)."""
    batches = loader.batches(epoch, start)
    count = batches_per_epoch(loader)
    if count is not None:
        for number, batch in enumerate(batches, start=start):
            yield batch, number == count - 1
        return
    ahead = next(batches, _END)
    if ahead is _END and start == 0:  # (an endless loop of empty epochs otherwise)
        raise LeantrainError(f"the training stream yielded no batch of {loader.batch_size} x "
                             f"{loader.shard[1]} process(es) in epoch {epoch + 1}")
    while ahead is not _END:
        current, ahead = ahead, next(batches, _END)
        yield current, ahead is _END


_END = object()


def first_batch(loader: Loader, role: str = "training") -> Batch:
    """The loader's first batch; a stream that ends before one is one line."""
    batch = next(iter(loader.batches()), _END)
    if batch is _END:
        raise LeantrainError(f"the {role} stream ended before its first batch of "
                             f"{loader.batch_size} x {loader.shard[1]} process(es)")
    return batch


def samples_from_start(dataset: Any, count: int) -> list[Any]:
    """`count` samples from the dataset's start, repeated when it holds fewer (a stream's first
    ones; one line when it yields none)."""
    if is_stream(dataset):
        found = first_samples(dataset, count)
        if not found:
            raise LeantrainError(f"the stream {type(dataset).__name__} yielded no sample")
        return [found[i % len(found)] for i in range(count)]
    held = len(dataset)
    return [dataset[i % held] for i in range(count)]


def first_sample(dataset: Any) -> Any:
    """Sample 0 of a map-style dataset, the first a stream yields (one line when empty)."""
    return dataset[0] if not is_stream(dataset) else samples_from_start(dataset, 1)[0]


def data_wait_advice(loader: Loader, device: torch.device, tensor_backed: bool) -> str:
    """The concrete fixes for a run that spends too long waiting for data."""
    if isinstance(loader, InMemoryBatches):
        if device.type == "cuda" and "resident" not in loader.kind:
            return ("free GPU memory so the data can stay on the GPU (it is copied every "
                    "step now), or a larger batch")
        return ("the in-memory loader is already one indexing per batch: the wait is per-step "
                "overhead, which a larger data.batch_size amortizes")
    options = loader.options
    if isinstance(loader, StreamBatches):
        return (f"more workers (data.num_workers={options.num_workers} now; data.num_workers="
                "auto measures the best count; each reads the whole stream and keeps its "
                "share, so a stream whose reading is slow gains less)")
    fixes = []
    if tensor_backed:
        fixes.append("data.loader=in-memory (batches by indexing, no per-sample collate)")
    fixes.append(f"more workers (data.num_workers={options.num_workers} now; data.num_workers="
                 "auto measures the best count)")
    if device.type == "cuda" and not options.pin_memory:
        fixes.append("data.pin_memory=true, so copies to the GPU can overlap compute")
    if options.num_workers:
        fixes.append(f"a larger data.prefetch_factor (now {options.prefetch_factor or 2})")
    return "; ".join(fixes)
