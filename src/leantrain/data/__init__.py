"""Data sources and loaders."""

from .batching import make_loader
from .loaders import DataLoaderBatches, InMemoryBatches, tensors_of
from .sources import DataBundle, load_data

__all__ = [
    "DataBundle", "DataLoaderBatches", "InMemoryBatches", "load_data", "make_loader", "tensors_of",
]
