"""Where training data comes from: built-in digits, files the user names, or the user's code.

Each source returns a train and a validation Dataset. Array sources (digits, .npz, CSV) return
TensorDatasets, which the loaders batch by indexing whole tensors at once; image folders return
a lazily decoding Dataset that goes through a DataLoader.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..config import DataConfig
from ..errors import LeantrainError
from ..imports import import_object
from .text import VOCAB, load_text

SPLIT_SEED = 0  # fixed, so every run (and every resume) sees the same split
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int | None  # None when only the model can tell (user datasets)
    description: str
    collate_fn: Callable[[list], Any] | None = None  # batches samples (e.g. padding)


def _split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _labels(y: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y))
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise LeantrainError(f"{where}: labels must be integer class indices, found fractions")
        y = y.round()
    y = y.long().reshape(-1)
    if len(y) and y.min() < 0:
        raise LeantrainError(f"{where}: labels must be >= 0, found {int(y.min())}")
    return y


def _array_bundle(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, what: str,
                  val: tuple[torch.Tensor, torch.Tensor] | None = None) -> DataBundle:
    if len(x) != len(y):
        raise LeantrainError(f"{what}: {len(x)} samples but {len(y)} labels")
    if val is None:
        train_idx, val_idx = _split(len(x), cfg.val_fraction)
        (xt, yt), (xv, yv) = (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
    else:
        (xt, yt), (xv, yv) = (x, y), val
    num_classes = int(max(yt.max(), yv.max())) + 1
    desc = f"{what}: {len(xt)} train / {len(xv)} val, input {tuple(xt.shape[1:])}, " \
           f"{num_classes} classes"
    return DataBundle(TensorDataset(xt, yt), TensorDataset(xv, yv), num_classes, desc)


def digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's bundled 8×8 digits, upscaled to 32×32 and standardised (train stats)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(raw.target, dtype=torch.long)
    bundle = _array_bundle(x, y, cfg, "digits")
    xt, yt = bundle.train.tensors
    xv, yv = bundle.val.tensors
    mean, std = xt.mean(), xt.std()
    bundle.train = TensorDataset((xt - mean) / std, yt)
    bundle.val = TensorDataset((xv - mean) / std, yv)
    return bundle


def npz(path: Path, cfg: DataConfig) -> DataBundle:
    with np.load(path) as arrays:
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise LeantrainError(f"{path}: .npz needs arrays 'x' and 'y'; has {arrays.files}")
        x = torch.as_tensor(arrays["x"]).float()
        y = _labels(arrays["y"], str(path))
        val = None
        if "x_val" in arrays.files and "y_val" in arrays.files:
            val = (torch.as_tensor(arrays["x_val"]).float(), _labels(arrays["y_val"], str(path)))
    return _array_bundle(x, y, cfg, f"npz {path.name}", val)


def csv_table(path: Path, cfg: DataConfig) -> DataBundle:
    """A CSV with a header; `label_column` holds class indices, every other column a number."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 3:
        raise LeantrainError(f"{path}: a CSV needs a header and at least two rows")
    header, body = rows[0], rows[1:]
    if cfg.label_column not in header:
        raise LeantrainError(
            f"{path}: no label column {cfg.label_column!r} (data.label_column); columns: {header}"
        )
    label_at = header.index(cfg.label_column)
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError as exc:
        raise LeantrainError(f"{path}: every CSV value must be a number ({exc})") from exc
    y = _labels(table[:, label_at], str(path))
    x = torch.tensor(np.delete(table, label_at, axis=1), dtype=torch.float32)
    bundle = _array_bundle(x, y, cfg, f"csv {path.name}")
    xt, yt = bundle.train.tensors
    xv, yv = bundle.val.tensors
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-8)  # tabular features: standardise per column
    bundle.train = TensorDataset((xt - mean) / std, yt)
    bundle.val = TensorDataset((xv - mean) / std, yv)
    return bundle


class ImageFolder(Dataset):
    """Images in class-named subfolders, decoded on access (per-item work: use workers)."""

    def __init__(self, items: list[tuple[Path, int]], size: int | None, channels: int):
        self.items, self.size, self.channels = items, size, channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            if self.size:
                img = img.resize((self.size, self.size))
            array = np.asarray(img, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        return tensor, label


def _scan(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    return [
        (file, label)
        for label, name in enumerate(classes)
        for file in sorted((folder / name).rglob("*"))
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]


def image_folder(path: Path, cfg: DataConfig) -> DataBundle:
    """root/<class>/*.png, or root/train/<class>/… and root/val/<class>/… for a fixed split."""
    split = (path / "train").is_dir() and (path / "val").is_dir()
    train_root = path / "train" if split else path
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise LeantrainError(f"{path}: an image folder needs one subfolder per class")
    items = _scan(train_root, classes)
    if not items:
        raise LeantrainError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    from PIL import Image

    sizes, modes = set(), set()
    for file, _ in items[:50]:  # a sample: decoding every image here would be slow
        with Image.open(file) as img:
            sizes.add(img.size)
            modes.add(img.mode)
    channels = 1 if modes <= {"L", "1", "I", "F"} else 3
    size = cfg.image_size
    if size is None and len(sizes) > 1:
        raise LeantrainError(f"{path}: images differ in size; set data.image_size")
    if split:
        train_items, val_items = items, _scan(path / "val", classes)
    else:
        train_idx, val_idx = _split(len(items), cfg.val_fraction)
        train_items = [items[i] for i in train_idx.tolist()]
        val_items = [items[i] for i in val_idx.tolist()]
    desc = f"images {path}: {len(train_items)} train / {len(val_items)} val, {len(classes)} classes"
    return DataBundle(ImageFolder(train_items, size, channels),
                      ImageFolder(val_items, size, channels), len(classes), desc)


def from_function(spec: str) -> DataBundle:
    """(train, val) or (train, val, collate_fn) from the user's function; a Hugging Face
    `datasets.Dataset` counts as a Dataset (it has __getitem__ and __len__)."""
    fn = import_object(spec, "--data")
    result = fn()
    if isinstance(result, DataBundle):
        return result
    datasets = result[:2] if isinstance(result, tuple) else ()
    collate = result[2] if isinstance(result, tuple) and len(result) == 3 else None
    if not (isinstance(result, tuple) and len(result) in (2, 3)
            and all(_is_dataset(d) for d in datasets)
            and (collate is None or callable(collate))):
        raise LeantrainError(
            f"--data {spec!r} must return (train_dataset, val_dataset) or (train_dataset, "
            f"val_dataset, collate_fn), the datasets map-style (__getitem__ and __len__), "
            f"got {type(result).__name__}")
    return DataBundle(datasets[0], datasets[1], None, f"{spec}: {len(datasets[0])} train / "
                      f"{len(datasets[1])} val", collate)


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__"))


def load_data(cfg: DataConfig) -> DataBundle:
    """Dispatch on `cfg.source`: 'digits', a path, or 'pkg.module:fn'."""
    source = cfg.source
    if cfg.context is not None:
        train, val, description = load_text(source, cfg.context, cfg.val_fraction,
                                            cfg.max_bytes)
        return DataBundle(train, val, VOCAB, description)
    if source == "digits":
        return digits(cfg)
    path = Path(source)
    if path.exists():
        if path.is_dir():
            return image_folder(path, cfg)
        if path.suffix == ".npz":
            return npz(path, cfg)
        if path.suffix == ".csv":
            return csv_table(path, cfg)
        raise LeantrainError(f"data file {path}: unsupported type; use .npz, .csv or a folder")
    if ":" in source and not source.startswith((".", "/")):
        return from_function(source)
    raise LeantrainError(f"data path not found: {source}")
