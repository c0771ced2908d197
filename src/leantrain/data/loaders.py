"""Batch iterators with a deterministic order per (seed, epoch), resumable mid-epoch.

Tensor-backed datasets get `InMemoryBatches`: one fancy-index per batch instead of a Python
`__getitem__` and a collate per sample, which on small models is most of the step time. Other
datasets go through a `DataLoader` whose sampler draws the same order. Both can start at batch
k of an epoch, which is what an exact resume needs.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

DEVICE_RESIDENT_FRACTION = 0.25  # move data to the GPU once if it takes < 25% of free memory
Batch = tuple[torch.Tensor, ...]  # (inputs, labels, *extras)


def tensors_of(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """(inputs, labels, *extras) if the dataset is a view of whole tensors, else None.

    Extras are further per-sample tensors (e.g. cached teacher logits) batched alongside.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return tuple(dataset.tensors)
    if isinstance(dataset, Subset):
        inner = tensors_of(dataset.dataset)
        if inner is not None:
            index = torch.as_tensor(dataset.indices, dtype=torch.long)
            return tuple(t[index] for t in inner)
    return None


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


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
                 drop_last: bool = False):
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if sum(t.nbytes for t in tensors) < DEVICE_RESIDENT_FRACTION * free:
                tensors = tuple(t.to(device) for t in tensors)
                self.kind = "in-memory batched, resident on the GPU"
        self.tensors, self.shard, self.drop_last = tensors, shard, drop_last
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return batch_count(len(self.tensors[0]), self.batch_size, self.shard, self.drop_last)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        n = len(self.tensors[0])
        order = epoch_order(n, self.seed, epoch, self.shuffle).to(self.tensors[0].device)
        for span in batch_spans(n, self.batch_size, self.shard, start, self.drop_last):
            index = order[span]
            yield tuple(t[index] for t in self.tensors)


class _EpochSampler(Sampler[int]):
    """This rank's samples of an epoch, from batch `skip_batches` on, in batch order."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, shard: Shard,
                 drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.shard, self.drop_last = shard, drop_last
        self.epoch, self.skip_batches = 0, 0

    def _indices(self) -> list[int]:
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        spans = batch_spans(self.n, self.batch_size, self.shard, self.skip_batches,
                            self.drop_last)
        return [i for span in spans for i in order[span].tolist()]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


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


class DataLoaderBatches:
    """A DataLoader over any map-style Dataset, with the same resumable order.

    On CUDA its batches go through a `DevicePrefetcher`, so copying batch k+1 to the GPU
    overlaps computing batch k.
    """

    kind = "DataLoader"

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                 options: LoaderOptions | None = None, device: torch.device | None = None,
                 shard: Shard = (0, 1), drop_last: bool = False):
        options = options or LoaderOptions()
        self.shard, self.drop_last = shard, drop_last
        self.sampler = _EpochSampler(len(dataset), batch_size, shuffle, seed, shard, drop_last)
        self.batch_size, self.options, self.device = batch_size, options, device
        workers = options.num_workers
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=options.pin_memory,
            persistent_workers=options.persistent_workers and workers > 0,
            prefetch_factor=options.prefetch_factor if workers else None,
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
        if self.prefetch:
            yield from DevicePrefetcher(iter(self.loader), self.device)
        else:
            yield from self.loader


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
            return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def __iter__(self) -> Iterator[Batch]:
        compute = torch.cuda.current_stream(self.device)
        ahead = self._copy(next(self.batches, None))
        while ahead is not None:
            compute.wait_stream(self.stream)
            for t in ahead:
                t.record_stream(compute)
            current, ahead = ahead, self._copy(next(self.batches, None))
            yield current


def data_wait_advice(loader: InMemoryBatches | DataLoaderBatches, device: torch.device,
                     tensor_backed: bool) -> str:
    """The concrete fixes for a run that spends too long waiting for data."""
    if isinstance(loader, InMemoryBatches):
        if device.type == "cuda" and "resident" not in loader.kind:
            return ("free GPU memory so the data can stay on the GPU (it is copied every "
                    "step now), or a larger batch")
        return ("the in-memory loader is already one indexing per batch: the wait is per-step "
                "overhead, which a larger data.batch_size amortizes")
    options = loader.options
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


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                device: torch.device | None = None, options: LoaderOptions | None = None,
                in_memory: bool = True, shard: Shard = (0, 1), drop_last: bool = False
                ) -> InMemoryBatches | DataLoaderBatches:
    """Batched indexing for a tensor-backed dataset unless `in_memory` is False, else a
    DataLoader. `drop_last` drops a short last batch (it always drops under several ranks)."""
    tensors = tensors_of(dataset)
    if tensors is not None and in_memory:
        return InMemoryBatches(*tensors, batch_size=batch_size, shuffle=shuffle, seed=seed,
                               device=device, shard=shard, drop_last=drop_last)
    return DataLoaderBatches(dataset, batch_size, shuffle, seed, options, device, shard,
                             drop_last)
