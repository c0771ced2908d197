"""Batch iterators with a deterministic order per (seed, epoch), resumable mid-epoch.

Tensor-backed datasets get `InMemoryBatches`: one fancy-index per batch instead of a Python
`__getitem__` and a collate per sample, which on small models is most of the step time. Other
datasets go through a `DataLoader` whose sampler draws the same order. Both can start at batch
k of an epoch, which is what an exact resume needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

DEVICE_RESIDENT_FRACTION = 0.25  # move data to the GPU once if it takes < 25% of free memory
Batch = tuple[torch.Tensor, torch.Tensor]


def tensors_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) if the dataset is a view of two whole tensors, else None."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = tensors_of(dataset.dataset)
        if inner is not None:
            index = torch.as_tensor(dataset.indices, dtype=torch.long)
            return inner[0][index], inner[1][index]
    return None


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class InMemoryBatches:
    """Batches by indexing whole tensors (optionally resident on the training device)."""

    kind = "in-memory batched"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, device: torch.device | None = None):
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if x.nbytes + y.nbytes < DEVICE_RESIDENT_FRACTION * free:
                x, y = x.to(device), y.to(device)
                self.kind = "in-memory batched, resident on the GPU"
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.x), self.seed, epoch, self.shuffle).to(self.x.device)
        for i in range(start * self.batch_size, len(order), self.batch_size):
            index = order[i:i + self.batch_size]
            yield self.x[index], self.y[index]


class _EpochSampler(Sampler[int]):
    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch, self.skip = 0, 0

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch, self.shuffle)[self.skip:].tolist())

    def __len__(self) -> int:
        return self.n - self.skip


class DataLoaderBatches:
    """A DataLoader over any map-style Dataset, with the same resumable order."""

    kind = "DataLoader"

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False):
        self.sampler = _EpochSampler(len(dataset), shuffle, seed)
        self.batch_size = batch_size
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=False,
        )
        self.kind = f"DataLoader (workers={num_workers}, pin_memory={pin_memory})"

    def __len__(self) -> int:
        return math.ceil(len(self.loader.dataset) / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        self.sampler.epoch, self.sampler.skip = epoch, start * self.batch_size
        yield from self.loader


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                device: torch.device | None = None, num_workers: int = 0
                ) -> InMemoryBatches | DataLoaderBatches:
    """The fastest loader that fits the dataset: batched indexing when it is tensor-backed."""
    tensors = tensors_of(dataset)
    if tensors is not None:
        return InMemoryBatches(*tensors, batch_size, shuffle, seed, device)
    pin = device is not None and device.type == "cuda"
    return DataLoaderBatches(dataset, batch_size, shuffle, seed, num_workers, pin)
