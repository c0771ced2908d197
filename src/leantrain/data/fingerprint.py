"""What a dataset is, in a few bytes: its length and a digest of samples spread across it.

A resume must continue on the data the run started with: a CSV that shrank or grew, or a
folder of other images, had a resumed run go on silently over other samples. The digest reads
`SAMPLES` samples at evenly spaced indices (a few `__getitem__` calls, not the whole set), so
it catches a changed length, order or content wherever those samples fall.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from .streams import first_samples, is_stream

SAMPLES = 8


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
                      .tobytes() if value.numel() else b"")
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode()[:1024])


def fingerprint(dataset: Dataset) -> dict[str, Any]:
    """{"samples": length, "digest": SHA-256 of SAMPLES evenly spaced samples}; a stream's
    (length None) digests its first SAMPLES samples."""
    if is_stream(dataset):
        digest = hashlib.sha256()
        for sample in first_samples(dataset, SAMPLES):
            _feed(digest, sample)
        return {"samples": None, "digest": digest.hexdigest()[:16]}
    count = len(dataset)
    digest = hashlib.sha256()
    for index in sorted({i * (count - 1) // max(SAMPLES - 1, 1) for i in range(SAMPLES)}
                        if count else ()):
        _feed(digest, dataset[index])
    return {"samples": count, "digest": digest.hexdigest()[:16]}
