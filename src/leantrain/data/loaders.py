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

from ..errors import LeantrainError

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


class InMemoryBatches:
    """Batches by indexing whole tensors (optionally resident on the training device)."""

    kind = "in-memory batched"

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, device: torch.device | None = None):
        if device is not None and device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if sum(t.nbytes for t in tensors) < DEVICE_RESIDENT_FRACTION * free:
                tensors = tuple(t.to(device) for t in tensors)
                self.kind = "in-memory batched, resident on the GPU"
        self.tensors = tensors
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        n = len(self.tensors[0])
        order = epoch_order(n, self.seed, epoch, self.shuffle).to(self.tensors[0].device)
        for i in range(start * self.batch_size, n, self.batch_size):
            index = order[i:i + self.batch_size]
            yield tuple(t[index] for t in self.tensors)


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
                device: torch.device | None = None, num_workers: int = 0, kind: str = "auto"
                ) -> InMemoryBatches | DataLoaderBatches:
    """The loader `kind` names; "auto" is batched indexing when the dataset is tensor-backed."""
    tensors = tensors_of(dataset)
    if kind == "in-memory" and tensors is None:
        raise LeantrainError(
            f"data.loader 'in-memory' needs a tensor-backed dataset (TensorDataset or a Subset "
            f"of one); this one is {type(dataset).__name__}: use 'auto' or 'dataloader'")
    if tensors is not None and kind != "dataloader":
        return InMemoryBatches(*tensors, batch_size=batch_size, shuffle=shuffle, seed=seed,
                               device=device)
    pin = device is not None and device.type == "cuda"
    return DataLoaderBatches(dataset, batch_size, shuffle, seed, num_workers, pin)
