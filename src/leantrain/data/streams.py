"""Streams: datasets without a length (a torch `IterableDataset`, or any re-iterable object
of samples), batched, split across ranks and loader workers, and resumable mid-epoch.

Every reader (a data-parallel rank x a loader worker) iterates the whole stream and keeps
its own part: global batch g holds samples [g·B·R, (g+1)·B·R) of the epoch's order (B the
batch size, R the data-parallel ranks), rank r takes the r-th B of them, and worker w of W
takes global batches w, w + W, w + 2W, ... of those it reads. The DataLoader takes batches
from its workers in turn, so each rank sees its batches in global order, and the readers
together see every sample of an epoch once (a last incomplete global batch is dropped under
several ranks: they must take as many steps as each other). Reading the whole stream on every
reader costs reading time, never compute; it splits any stream, whatever its shards.

A resume from batch k of an epoch reads (and drops) the epoch's first k global batches:
exact for a stream that yields the same samples in the same order when iterated again for the
same epoch (`set_epoch(epoch)` is called when the stream has it, the Hugging Face convention).
Random numbers the stream draws (torch's and Python's) come from a state of its own, seeded
per epoch and the same on every reader, so sample i is the same whichever rank or worker
reads it, and reading ahead or dropping batches never moves the training's numbers (dropout).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import LeantrainError, one_line
from .hf import whole_stream
from .loaders import Batch, CheckedCollate, CollateError, DevicePrefetcher, LoaderOptions, Shard


def is_stream(data: Any) -> bool:
    """A dataset without a length: an IterableDataset, or an iterable without __len__ or
    __getitem__ (a map-style dataset has both)."""
    if isinstance(data, IterableDataset):
        return True
    return hasattr(data, "__iter__") and not (hasattr(data, "__len__")
                                              and hasattr(data, "__getitem__"))


def check_stream(data: Any, role: str) -> None:
    """A stream must start over when iterated again (each epoch and each reader does): a
    generator or an iterator is used up after one pass."""
    name = type(data).__name__
    try:
        again = iter(data) is data
    except Exception as exc:
        raise LeantrainError(f"the {role} stream ({name}) raised {one_line(exc)} when "
                             "iterated") from exc
    if again:
        raise LeantrainError(f"the {role} set is a {name}, which is used up after one pass; "
                             "give an object whose __iter__ starts the stream over (a torch "
                             "IterableDataset), so epochs, loader workers and resumes can "
                             "read it again")


class _OwnRandom:
    """Torch's and Python's random state while the stream is read: its own, seeded per epoch,
    swapped in while the reader runs and out while the training does (between batches: a
    swap costs ~30 µs, mostly Python's getstate)."""

    def __init__(self, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.torch_state = torch.get_rng_state()
        self.python_state = random.Random(seed).getstate()
        self.outer: tuple | None = None

    def enter(self) -> None:
        self.outer = torch.get_rng_state(), random.getstate()
        torch.set_rng_state(self.torch_state)
        random.setstate(self.python_state)

    def leave(self) -> None:
        self.torch_state, self.python_state = torch.get_rng_state(), random.getstate()
        torch.set_rng_state(self.outer[0])
        random.setstate(self.outer[1])

    def around(self, steps: Iterator[Any]) -> Iterator[Any]:
        """`steps` run under the stream's state, what they yield handed out under the
        caller's."""
        self.enter()
        try:
            for item in steps:
                self.leave()
                try:
                    yield item
                finally:
                    self.enter()
        finally:
            self.leave()


def first_samples(stream: Any, count: int) -> list[Any]:
    """The stream's first `count` samples as a reader of epoch 0 with seed 0 sees them (its
    random numbers its own): outside the epoch (a fingerprint), the training's stay put."""
    return list(_OwnRandom(0).around(itertools.islice(whole_stream(stream), count)))


class _Reader(IterableDataset):
    """One reader's batches of one epoch of the stream, from global batch `start` on."""

    def __init__(self, stream: Any, batch_size: int, shard: Shard, keep_partial: bool,
                 collate: CheckedCollate, epoch: int, start: int, seed: int):
        self.stream, self.batch_size, self.shard = stream, batch_size, shard
        self.keep_partial, self.collate = keep_partial, collate
        self.epoch, self.start, self.seed = epoch, start, seed

    def __iter__(self) -> Iterator[Batch]:
        # the same state on every reader: sample i is the same whoever reads it
        return _OwnRandom(self.seed * 100_003 + self.epoch).around(self._batches())

    def _batches(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, ranks = self.shard
        per_global = self.batch_size * ranks
        mine = range(rank * self.batch_size, (rank + 1) * self.batch_size)
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(self.epoch)
        samples, index, kept = whole_stream(self.stream), 0, []
        while True:
            sample = self._next(samples, index)
            if sample is _END:
                break
            batch, within = divmod(index, per_global)
            # the DataLoader takes its workers' batches in turn from worker 0 on
            if batch >= self.start and (batch - self.start) % workers == worker \
                    and within in mine:
                kept.append(sample)
            index += 1
            if within == per_global - 1 and kept:
                yield self._collated(kept, batch)
                kept = []
        if kept and self.keep_partial:
            yield self._collated(kept, index // per_global)
        if index == 0:
            raise LeantrainError(f"the stream {type(self.stream).__name__} yielded no sample "
                                 f"in epoch {self.epoch + 1}")

    def _next(self, samples: Iterator[Any], index: int) -> Any:
        try:
            return next(samples)
        except StopIteration:
            return _END
        except LeantrainError:
            raise
        except Exception as exc:
            raise LeantrainError(f"the stream {type(self.stream).__name__} raised "
                                 f"{one_line(exc)} at sample {index} of epoch {self.epoch + 1} "
                                 "(--debug shows its traceback)") from exc

    def _collated(self, samples: list[Any], batch: int) -> Batch:
        try:
            return self.collate(samples)
        except CollateError as exc:
            if exc.position is None:
                raise
            first = batch * self.batch_size * self.shard[1] + self.shard[0] * self.batch_size
            raise CollateError(f"{exc} (sample {first + exc.position} of epoch "
                               f"{self.epoch + 1} of the stream)", exc.position) from exc


_END = object()


class StreamBatches:
    """Batches of a stream for one rank, epoch by epoch; no length (the epoch ends where the
    stream does), so a run over a stream is bounded by train.max_steps."""

    kind = "stream"

    def __init__(self, dataset: Any, batch_size: int, seed: int = 0,
                 options: LoaderOptions | None = None, device: torch.device | None = None,
                 shard: Shard = (0, 1), drop_last: bool = False,
                 collate_fn: Callable[[list], Any] | None = None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        # (a stream's workers start afresh each epoch: they read from that epoch's start)
        self.options = replace(options or LoaderOptions(), persistent_workers=False)
        self.device, self.shard = device, shard
        self.keep_partial = shard[1] == 1 and not drop_last
        self.collate = CheckedCollate(collate_fn)
        self.generator = torch.Generator()
        self.prefetch = device is not None and device.type == "cuda"
        self.kind = f"stream ({self.options.describe()})" + (", device prefetch"
                                                             if self.prefetch else "")

    def _loader(self, epoch: int, start: int) -> DataLoader:
        workers = self.options.num_workers
        reader = _Reader(self.dataset, self.batch_size, self.shard, self.keep_partial,
                         self.collate, epoch, start, self.seed)
        self.generator.manual_seed(self.seed * 100_003 + epoch)  # the workers' seeds
        return DataLoader(reader, batch_size=None, num_workers=workers,
                          pin_memory=self.options.pin_memory,
                          prefetch_factor=self.options.prefetch_factor if workers else None,
                          generator=self.generator)

    @property
    def loader(self) -> DataLoader:
        """The first epoch's host batches (what the loader tuning times)."""
        return self._loader(0, 0)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        loader = self._loader(epoch, start)
        yield from DevicePrefetcher(iter(loader), self.device) if self.prefetch else loader
