"""In-memory batching: build each batch with one index into whole tensors.

A per-sample `DataLoader` calls `__getitem__` and collates once per sample in Python, which on
small models is most of the step time. When the dataset is a view of whole tensors, indexing
them with a batch of indices does the same work in one vectorised op (and, on a GPU with room,
the tensors move to the device once). Lossless: the same samples in the same order. Needs a
tensor-backed dataset; the loader itself lives in `data.loaders`.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ..data.loaders import tensors_of
from .variant import Variant

NAME = "loader"
LOSSLESS = True
VARIANTS = (Variant("in-memory loader", {"data": {"loader": "in-memory"}}),)


def supported(dataset: Dataset) -> tuple[bool, str]:
    if tensors_of(dataset) is None:
        return False, f"{type(dataset).__name__} is not tensor-backed; a DataLoader is needed"
    return True, "tensor-backed dataset"
