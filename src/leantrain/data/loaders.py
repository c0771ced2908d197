"""Batch iterators with a deterministic order per (seed, epoch), resumable mid-epoch.

A batch is any structure of tensors (a tuple, a dict, nested ones). Tensor-backed datasets
(a `TensorDataset`, a `TensorDictDataset`, or a `Subset` of one) get `InMemoryBatches`: one
fancy-index per batch instead of a Python `__getitem__` and a collate per sample, which on
small models is most of the step time. Other datasets go through a `DataLoader` whose sampler
draws the same order, and whose collate failures name the sample. Both can start at batch
k of an epoch, which is what an exact resume needs.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset, default_collate

from ..errors import LeantrainError, one_line
from ..measure.memory import available_ram_bytes

DEVICE_RESIDENT_FRACTION = 0.25  # move data to the GPU once if it takes < 25% of free memory
Batch = Any  # (inputs, labels, *extras), a dict of tensors, or any nesting of them
Tensors = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
LABEL_KEYS = ("labels", "label")


class TensorDictDataset(Dataset):
    """Samples as dicts of equally long tensors, e.g. tokenized text: `input_ids`,
    `attention_mask`, `labels`. Batched by indexing (the in-memory loader), like a
    TensorDataset."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, **more: torch.Tensor):
        self.tensors = {**(tensors or {}), **more}
        lengths = {k: len(t) for k, t in self.tensors.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise LeantrainError(f"TensorDictDataset needs tensors of one length, got {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: t[index] for k, t in self.tensors.items()}


def tensors_of(dataset: Dataset) -> Tensors | None:
    """The whole tensors behind a dataset, (inputs, labels, *extras) or a dict, else None.

    Extras are further per-sample tensors (e.g. cached teacher logits) batched alongside.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return tuple(dataset.tensors)
    if isinstance(dataset, TensorDictDataset):
        return dict(dataset.tensors)
    if isinstance(dataset, Subset):
        inner = tensors_of(dataset.dataset)
        if inner is not None:
            return index_tensors(inner, torch.as_tensor(dataset.indices, dtype=torch.long))
    return None


def index_tensors(tensors: Tensors, index: torch.Tensor) -> Tensors:
    if isinstance(tensors, dict):
        return {k: t[index] for k, t in tensors.items()}
    return tuple(t[index] for t in tensors)


def labels_of(batch: Batch):
    """The labels of a batch or of whole tensors: a `labels`/`label` key, or the second item."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if k in batch), None)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    return None


def first_tensor(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch \
        if isinstance(batch, (tuple, list)) else ()
    return next((t for t in map(first_tensor, values) if t is not None), None)


def batch_size(batch: Batch) -> int:
    """Samples in a batch: the length of its labels, else of its first tensor."""
    labels = labels_of(batch)
    tensor = labels if isinstance(labels, torch.Tensor) else first_tensor(batch)
    return len(tensor) if tensor is not None and tensor.dim() else 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The epoch's sample order: int32 below 2**31 samples (the same permutation as int64, half
    the memory: 31 MB for the 7.8 M windows of a billion tokens)."""
    dtype = torch.int32 if n < 2**31 else torch.int64
    if not shuffle:
        return torch.arange(n, dtype=dtype)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
                          dtype=dtype)


Shard = tuple[int, int]  # (rank, world size)


def batch_spans(n: int, batch_size: int, shard: Shard, start: int = 0,
                drop_last: bool = False) -> Iterator[slice]:
    """Positions in the epoch order of this rank's batches, from batch `start` on.

    With W ranks, global batch i is positions [i·B·W, (i+1)·B·W) and rank r takes the r-th
    B of them: the ranks together see exactly what one process with batch B·W would. The
    last global batch is dropped when incomplete (every rank must take the same number of
    steps, or the gradient all-reduce would wait forever); one process keeps its last batch
    unless `drop_last` (a compiled model would recompile for its shape).
    """
    rank, world = shard
    step = batch_size * world
    stop = n if world == 1 and not drop_last else n - n % step
    for i in range(start * step, stop, step):
        lo = i + rank * batch_size
        yield slice(lo, min(lo + batch_size, n))


def batch_count(n: int, batch_size: int, shard: Shard, drop_last: bool = False) -> int:
    world = shard[1]
    return math.ceil(n / batch_size) if world == 1 and not drop_last \
        else n // (batch_size * world)


class InMemoryBatches:
    """Batches by indexing whole tensors (optionally resident on the training device)."""

    kind = "in-memory batched"

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, device: torch.device | None = None, shard: Shard = (0, 1),
                 drop_last: bool = False, named: dict[str, torch.Tensor] | None = None):
        """Positional tensors batch as tuples; `named` ones (instead) as dicts."""
        tensors = named if named is not None else tensors
        whole = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if sum(t.nbytes for t in whole) < DEVICE_RESIDENT_FRACTION * free:
                tensors = {k: t.to(device) for k, t in tensors.items()} \
                    if isinstance(tensors, dict) else tuple(t.to(device) for t in tensors)
                whole = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
                self.kind = "in-memory batched, resident on the GPU"
        self.tensors, self.shard, self.drop_last = tensors, shard, drop_last
        self.n, self.device = len(whole[0]), whole[0].device
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return batch_count(self.n, self.batch_size, self.shard, self.drop_last)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        order = epoch_order(self.n, self.seed, epoch, self.shuffle).to(self.device)
        for span in batch_spans(self.n, self.batch_size, self.shard, start, self.drop_last):
            yield index_tensors(self.tensors, order[span])


class _EpochSampler(Sampler[int]):
    """This rank's samples of an epoch, from batch `skip_batches` on, in batch order."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, shard: Shard,
                 drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.shard, self.drop_last = shard, drop_last
        self.epoch, self.skip_batches = 0, 0

    def _spans(self, skip: int = 0) -> Iterator[slice]:
        return batch_spans(self.n, self.batch_size, self.shard, self.skip_batches + skip,
                           self.drop_last)

    def __iter__(self) -> Iterator[int]:
        # batch by batch: a list of every index would be 36 bytes a sample (150 MB for the
        # 4 M windows of a billion-token corpus), the order tensor is 8
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        for span in self._spans():
            yield from order[span].tolist()

    def batch_indices(self, number: int) -> list[int]:
        """The dataset indices of batch `number` of the current pass."""
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        return order[next(self._spans(number))].tolist()

    def __len__(self) -> int:
        return sum(span.stop - span.start for span in self._spans())


@dataclass(frozen=True)
class LoaderOptions:
    """How a DataLoader feeds the trainer (see `data.tuning` for choosing them by measurement)."""

    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int | None = None  # None: DataLoader's default (2 with workers)
    persistent_workers: bool = False
    # torch's intra-op threads in the training process while this loader feeds it (None:
    # unchanged). On a CPU-bound machine, workers and compute threads compete for the same
    # cores; fewer compute threads can be faster than oversubscribed ones.
    compute_threads: int | None = None

    def describe(self) -> str:
        text = f"workers={self.num_workers}, pin_memory={self.pin_memory}"
        if self.num_workers:
            text += (f", prefetch_factor={self.prefetch_factor or 2}, "
                     f"persistent_workers={self.persistent_workers}")
        if self.compute_threads:
            text += f", compute_threads={self.compute_threads}"
        return text


@contextmanager
def compute_threads(options: LoaderOptions | None) -> Iterator[None]:
    """Run with the options' torch thread count, restored afterwards."""
    wanted = options.compute_threads if options else None
    before = torch.get_num_threads()
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CollateError(LeantrainError):
    """A collate_fn failed on a batch; `position` is the failing sample's place in it."""

    def __init__(self, message: str, position: int | None = None):
        super().__init__(message)
        self.position = position


def first_non_finite(value: Any) -> tuple[int, float] | None:
    """(sample index, value) of the first NaN or inf in the floating-point tensors of a batch
    or of whole tensors (samples along dim 0); None when all are finite."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() == 0:
            return None
        bad = ~torch.isfinite(value.reshape(len(value), -1)).all(dim=1)
        if not bad.any():
            return None
        i = int(bad.nonzero()[0])
        row = value[i].reshape(-1)
        return i, float(row[~torch.isfinite(row)][0])
    values = value.values() if isinstance(value, Mapping) else value \
        if isinstance(value, (tuple, list)) else ()
    found = [f for f in map(first_non_finite, values) if f is not None]
    return min(found) if found else None


class CheckedCollate:
    """A collate_fn whose failure names the sample it failed on, in one line."""

    def __init__(self, collate_fn: Callable[[list], Any] | None = None):
        self.collate_fn = collate_fn or default_collate
        self.name = getattr(collate_fn, "__name__", type(collate_fn).__name__) \
            if collate_fn else "the default collate"

    def __call__(self, samples: list) -> Any:
        try:
            batch = self.collate_fn(samples)
        except Exception as exc:
            position = next((i for i, sample in enumerate(samples) if not self._collates(sample)),
                            None)
            why = one_line(exc)
            where = f"at sample {position} of a batch of {len(samples)}" if position is not None \
                else (f"on a batch of {len(samples)} samples that collate one by one but not "
                      "together (e.g. sequences of different lengths: pad them in a collate_fn)")
            raise CollateError(f"{self.name} failed {where}: {why}", position) from exc
        # streamed data is checked as it comes (in the workers, off the training step's path);
        # tensor-backed data is checked whole before training (run.plan)
        bad = first_non_finite(batch)
        if bad is not None:
            raise CollateError(f"an input value is {bad[1]} at sample {bad[0]} of a batch of "
                               f"{len(samples)}; inputs must be finite numbers", bad[0])
        return batch

    def _collates(self, sample: Any) -> bool:
        try:
            self.collate_fn([sample])
        except Exception:
            return False
        return True


def _naming_samples(batches: Iterator[Batch], indices: Callable[[int], list[int]]
                    ) -> Iterator[Batch]:
    """Batches, with a collate failure's batch position turned into the dataset's index."""
    number = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except CollateError as exc:
            if exc.position is None:
                raise
            index = indices(number)[exc.position]
            raise CollateError(f"{exc} (dataset index {index})", exc.position) from exc
        number += 1
        yield batch


def checked_length(dataset: Dataset) -> int:
    """`len(dataset)`, refused in one line when it cannot be true: not a count, or more
    samples than an epoch's order (8 bytes each) could be held in this machine's memory (a
    `__len__` of 1e12 asked for an 8 TB permutation)."""
    name = type(dataset).__name__
    try:
        count = len(dataset)
    except Exception as exc:
        raise LeantrainError(f"{name}'s __len__ raised {one_line(exc)}") from exc
    room = available_ram_bytes()
    if room is not None and 8 * count > room:
        raise LeantrainError(f"{name} says it holds {count:,} samples (its __len__): an "
                             f"epoch's order of them needs {8 * count / 2**30:,.0f} GiB, more "
                             "than this machine has; check __len__, or stream the data")
    return count


class SampleErrors(Dataset):
    """The user's dataset, whose failure on a sample (a corrupt record mid-epoch) is one line
    naming the dataset and the index, not a traceback from inside the loader (`--debug`
    shows the user's own)."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.name = dataset, type(dataset).__name__

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except LeantrainError:
            raise
        except Exception as exc:
            raise LeantrainError(f"{self.name}[{index}] raised {one_line(exc)} (--debug shows "
                                 "its traceback)") from exc

    def __getitems__(self, indices: list[int]) -> list[Any]:
        many = getattr(self.dataset, "__getitems__", None)  # (a Hugging Face dataset's)
        if many is None:
            return [self[i] for i in indices]
        try:
            return many(indices)
        except Exception as exc:
            raise LeantrainError(f"{self.name}[{indices[0]}..{indices[-1]}] raised "
                                 f"{one_line(exc)} (--debug shows its traceback)") from exc


class DataLoaderBatches:
    """A DataLoader over any map-style Dataset, with the same resumable order.

    On CUDA its batches go through a `DevicePrefetcher`, so copying batch k+1 to the GPU
    overlaps computing batch k.
    """

    kind = "DataLoader"

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                 options: LoaderOptions | None = None, device: torch.device | None = None,
                 shard: Shard = (0, 1), drop_last: bool = False,
                 collate_fn: Callable[[list], Any] | None = None):
        options = options or LoaderOptions()
        self.shard, self.drop_last = shard, drop_last
        count = checked_length(dataset)
        dataset = SampleErrors(dataset)
        self.sampler = _EpochSampler(count, batch_size, shuffle, seed, shard, drop_last)
        self.batch_size, self.options, self.device = batch_size, options, device
        workers = options.num_workers
        # the DataLoader draws its workers' base seed from this generator, not from torch's
        # global RNG (which a resume restores: a draw there would shift dropout), re-seeded
        # per epoch so a resumed epoch seeds its workers as the first run did
        self.seed, self.generator = seed, torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=options.pin_memory,
            persistent_workers=options.persistent_workers and workers > 0,
            prefetch_factor=options.prefetch_factor if workers else None,
            collate_fn=CheckedCollate(collate_fn), generator=self.generator,
        )
        self.kind = f"DataLoader ({options.describe()})"
        self.prefetch = device is not None and device.type == "cuda"
        if self.prefetch:
            self.kind += ", device prefetch"

    def __len__(self) -> int:
        return batch_count(len(self.loader.dataset), self.batch_size, self.shard,
                           self.drop_last)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        if self.options.num_workers and torch.cuda.is_initialized():
            # a forked worker that garbage-collects a CUDA tensor inherited in a reference
            # cycle aborts (CUDA cannot run in a fork; seen on an H100): collect them first
            gc.collect()
        self.sampler.epoch, self.sampler.skip_batches = epoch, start
        self.generator.manual_seed(self.seed * 100_003 + epoch)
        batches = _naming_samples(iter(self.loader), self.sampler.batch_indices)
        if self.prefetch:
            yield from DevicePrefetcher(batches, self.device)
        else:
            yield from batches


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`batch` cut into `parts` micro-batches along the first dimension, every tensor alike
    (fewer parts when it holds fewer samples); anything that is not a tensor is repeated."""
    parts = max(1, min(parts, batch_size(batch)))

    def cut(value: Any) -> list[Any]:
        if isinstance(value, torch.Tensor):
            return list(torch.tensor_split(value, parts)) if value.dim() else [value] * parts
        if isinstance(value, Mapping):
            pieces = {k: cut(v) for k, v in value.items()}
            return [{k: pieces[k][i] for k in value} for i in range(parts)]
        if isinstance(value, (tuple, list)):
            pieces = [cut(v) for v in value]
            return [type(value)(piece[i] for piece in pieces) for i in range(parts)]
        return [value] * parts

    return cut(batch)


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], Any]) -> Batch:
    """`batch` with `fn` applied to every tensor in it (dicts, tuples, lists nested)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


class DevicePrefetcher:
    """Copies the next batch to the GPU on a side stream while the current one computes.

    The copies are non-blocking, which overlaps them with compute only from pinned host
    memory (hence pin_memory on CUDA). The compute stream waits for the copy stream before
    it uses a batch, and `record_stream` stops the allocator from reusing a batch's memory
    while the compute stream may still read it.
    """

    def __init__(self, batches: Iterator[Batch], device: torch.device):
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device)

    def _copy(self, batch: Batch | None) -> Batch | None:
        if batch is None:
            return None
        with torch.cuda.stream(self.stream):
            return map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[Batch]:
        compute = torch.cuda.current_stream(self.device)
        ahead = self._copy(next(self.batches, None))
        while ahead is not None:
            compute.wait_stream(self.stream)
            map_tensors(ahead, lambda t: t.record_stream(compute))
            current, ahead = ahead, self._copy(next(self.batches, None))
            yield current
