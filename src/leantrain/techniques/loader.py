"""In-memory batching: build each batch with one index into whole tensors.

A per-sample `DataLoader` calls `__getitem__` and collates once per sample in Python, which on
small models is most of the step time. When the dataset is a view of whole tensors, indexing
them with a batch of indices does the same work in one vectorised op (and, on a GPU with room,
the tensors move to the device once). Lossless: the same samples in the same order. Needs a
tensor-backed dataset; the loaders themselves live in `data.loaders`, and the DataLoader's
"auto" settings are measured by `data.tuning`.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import DataConfig
from ..data.loaders import LoaderOptions, tensors_of
from ..errors import LeantrainError
from .variant import Variant

NAME = "loader"
LOSSLESS = True
VARIANTS = (Variant("in-memory loader", {"data": {"loader": "in-memory"}}),)
TUNABLE = ("num_workers", "pin_memory", "prefetch_factor", "persistent_workers")


def backed_by_tensors(dataset: Dataset) -> tuple[bool, str]:
    if tensors_of(dataset) is None:
        return False, f"{type(dataset).__name__} is not tensor-backed; a DataLoader is needed"
    return True, "tensor-backed dataset"


def in_memory(setting: str, dataset: Dataset, collate_fn=None) -> bool:
    """data.loader: "auto" is batched indexing whenever the dataset is tensor-backed and no
    collate_fn has to see its samples."""
    ok, _ = backed_by_tensors(dataset)
    if setting == "in-memory" and not ok:
        raise LeantrainError(
            f"data.loader 'in-memory' needs a tensor-backed dataset (TensorDataset, "
            f"TensorDictDataset or a Subset of one); this one is {type(dataset).__name__}: "
            f"use 'auto' or 'dataloader'")
    if setting == "in-memory" and collate_fn is not None:
        raise LeantrainError("data.loader 'in-memory' batches by indexing and never calls a "
                             "collate_fn; use 'auto' or 'dataloader' with one")
    return ok and setting != "dataloader" and collate_fn is None


def auto_fields(data: DataConfig) -> set[str]:
    """The DataLoader settings left to measurement ("auto")."""
    return {k for k in TUNABLE if getattr(data, k) == "auto"}


def worth_measuring(auto: set[str], base: LoaderOptions, on_cuda: bool) -> bool:
    """Whether the "auto" settings leave more than one candidate to measure."""
    return ("num_workers" in auto or (base.num_workers > 0 and "prefetch_factor" in auto)
            or (on_cuda and "pin_memory" in auto))


def default_options(data: DataConfig, on_cuda: bool, epochs: int) -> LoaderOptions:
    """LoaderOptions from the config, "auto" replaced by the unmeasured defaults."""
    workers = data.num_workers if data.num_workers != "auto" else 0
    pin = data.pin_memory if data.pin_memory != "auto" else on_cuda
    prefetch = data.prefetch_factor if data.prefetch_factor != "auto" else None
    persistent = data.persistent_workers if data.persistent_workers != "auto" \
        else workers > 0 and epochs > 1
    return LoaderOptions(workers, pin, prefetch, persistent)
