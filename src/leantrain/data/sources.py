"""Where training data comes from: built-in digits, files the user names, or the user's code.

Each source returns a train and a validation Dataset. Array sources (digits, .npz, CSV) return
TensorDatasets, which the loaders batch by indexing whole tensors at once; image folders return
a lazily decoding Dataset that goes through a DataLoader.
"""

from __future__ import annotations

import contextlib
import csv
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..config import TP_PLAN_FLAG, DataConfig
from ..errors import LeantrainError, bounded_repr, one_line, shorten
from ..imports import call_user, own_builder
from .hf import torch_formatted
from .streams import check_stream, is_stream
from .tables import is_table, labelled_table
from .text import VOCAB, load_text
from .tokenize import tokenized
from .tokens import is_token_folder, open_token_folder

SPLIT_SEED = 0  # fixed, so every run (and every resume) sees the same split
# the most classes a label may imply: the default model's head holds one row per class, so a
# stray id (1e12) would be a petabyte allocation; 2**20 is above any real label set we know
MAX_CLASSES = 2**20
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


def _numbers(values: np.ndarray, where: str, what: str) -> torch.Tensor:
    """`values` as a float tensor whose every entry is a finite number, or one line naming the
    first sample that is not."""
    array = np.asarray(values)
    if not _real(array):
        raise LeantrainError(f"{where}: {what} must be numbers, found dtype {array.dtype} "
                             f"(e.g. {array.reshape(-1)[:1].tolist()})")
    if array.ndim == 0:
        raise LeantrainError(f"{where}: {what} is one number; give an array with one row per "
                             "sample")
    x = torch.as_tensor(array).float()
    bad = ~torch.isfinite(x)
    if bad.any():
        at = bad.nonzero()[0].tolist()
        position = f" at position {tuple(at[1:])}" if len(at) > 1 else ""
        raise LeantrainError(f"{where}: {what} of sample {at[0]}{position} is "
                             f"{x[tuple(at)].item()}; inputs must be finite numbers")
    return x


def _real(array: np.ndarray) -> bool:
    """Real numbers or booleans (complex values would silently lose their imaginary part)."""
    return array.dtype == np.bool_ or (np.issubdtype(array.dtype, np.number)
                                       and not np.issubdtype(array.dtype, np.complexfloating))


def _labels(y: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    """The labels as class indices (int64), or one line naming the first sample whose label is
    not an integer in 0..MAX_CLASSES-1."""
    array = np.asarray(y)
    if not _real(array):
        raise LeantrainError(f"{where}: labels must be integer class indices, found dtype "
                             f"{array.dtype} (e.g. {array.reshape(-1)[:1].tolist()}); map "
                             "class names to 0..classes-1")
    y = torch.as_tensor(array).reshape(-1)
    values = y.double() if y.is_floating_point() else y.long()
    bad = (values < 0) | (values >= MAX_CLASSES) | (values != values.round()) \
        if y.is_floating_point() else (values < 0) | (values >= MAX_CLASSES)
    if y.is_floating_point():
        bad |= ~torch.isfinite(values)
    if bad.any():
        at = int(bad.nonzero()[0])
        value = values[at].item()
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        raise LeantrainError(f"{where}: sample {at}'s label is {shown}; labels must be "
                             f"integer class indices 0..classes-1, below {MAX_CLASSES:,} (an "
                             "id or a regression target is not a class)")
    return values.long()


def _array_bundle(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, what: str,
                  val: tuple[torch.Tensor, torch.Tensor] | None = None) -> DataBundle:
    if len(x) != len(y):
        raise LeantrainError(f"{what}: {len(x)} samples but {len(y)} labels")
    if len(x) and x[0].numel() == 0:
        raise LeantrainError(f"{what}: the samples hold no values (inputs of shape "
                             f"{tuple(x.shape)}); give at least one feature column")
    if val is not None:
        if len(val[0]) != len(val[1]):
            raise LeantrainError(f"{what}: the validation arrays need one row per label "
                                 f"(x_val {tuple(val[0].shape)}, y_val {tuple(val[1].shape)})")
        if len(val[0]) == 0:
            raise LeantrainError(f"{what}: the validation arrays are empty")
        if val[0].shape[1:] != x.shape[1:]:
            raise LeantrainError(f"{what}: x_val's samples are {tuple(val[0].shape[1:])} but "
                                 f"x's are {tuple(x.shape[1:])}; they must match")
    check_sample_count(len(x) + (len(val[0]) if val is not None else 0), what,
                       split=val is None)
    if val is None:
        train_idx, val_idx = _split(len(x), cfg.val_fraction)
        (xt, yt), (xv, yv) = (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
    else:
        (xt, yt), (xv, yv) = (x, y), val
    num_classes = int(max(yt.max(), yv.max())) + 1
    desc = f"{what}: {len(xt)} train / {len(xv)} val, input {tuple(xt.shape[1:])}, " \
           f"{num_classes} classes"
    return DataBundle(TensorDataset(xt, yt), TensorDataset(xv, yv), num_classes, desc)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images 1797x8x8, labels) of scikit-learn's bundled digits, read with numpy from the
    file `sklearn.datasets.load_digits` reads: importing scikit-learn took 1.07 s of a 9.7 s
    run (2-core AMD EPYC). scikit-learn's own loader where its file is not found."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # (finds the package, imports nothing)
    places = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(p) / "datasets" / "data" / "digits.csv.gz" for p in places]
    found = [f for f in found if f.is_file()]
    if not found:
        from sklearn.datasets import load_digits

        raw = load_digits()
        return raw.images, raw.target
    with gzip.open(found[0], "rt") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's bundled 8×8 digits, upscaled to 32×32 and standardised (train stats)."""
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(target, dtype=torch.long)
    bundle = _array_bundle(x, y, cfg, "digits")
    xt, yt = bundle.train.tensors
    xv, yv = bundle.val.tensors
    mean, std = xt.mean(), xt.std()
    bundle.train = TensorDataset((xt - mean) / std, yt)
    bundle.val = TensorDataset((xv - mean) / std, yv)
    return bundle


def npz(path: Path, cfg: DataConfig) -> DataBundle:
    try:
        return _npz(path, cfg)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:  # empty, cut, damaged
        # (ValueError: pickled object arrays, which are never loaded)
        raise LeantrainError(f"{path}: not a readable .npz of numeric arrays: "
                             f"{shorten(one_line(exc))}") from None


def _check_npz_headers(path: Path) -> None:
    """Each array's header against the bytes its member holds, before numpy allocates what a
    header asks for (a crafted header asked for 1.82 TiB)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
                room = info.file_size - member.tell()
            wanted = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if wanted > room and not dtype.hasobject:  # (objects: np.load refuses them)
                raise LeantrainError(
                    f"{path}: array {shorten(info.filename[:-4], 40)!r} says it is "
                    f"{tuple(shape)} of {dtype} ({wanted:,} bytes) but holds {room:,} bytes: "
                    "a damaged or crafted file")


def _npz(path: Path, cfg: DataConfig) -> DataBundle:
    with np.load(path) as arrays:
        _check_npz_headers(path)  # (once numpy has opened it: an empty file is its error)
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise LeantrainError(f"{path}: .npz needs arrays 'x' and 'y'; has {arrays.files}")
        x = _numbers(arrays["x"], str(path), "'x'")
        y = _labels(arrays["y"], str(path))
        val = None
        if "x_val" in arrays.files and "y_val" in arrays.files:
            val = (_numbers(arrays["x_val"], str(path), "'x_val'"),
                   _labels(arrays["y_val"], str(path)))
    return _array_bundle(x, y, cfg, f"npz {path.name}", val)


def csv_table(path: Path, cfg: DataConfig) -> DataBundle:
    """A CSV with a header; `label_column` holds class indices, every other column a number."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise LeantrainError(f"{path}: byte {exc.start} is not UTF-8; a CSV must be UTF-8 "
                             "text") from None
    except csv.Error as exc:  # a NUL byte, a field over the csv module's size limit
        raise LeantrainError(f"{path}: not a readable CSV: {shorten(exc)}") from None
    except OSError as exc:
        raise LeantrainError(f"{path}: cannot read it: {exc.strerror}") from None
    if len(rows) < 3:
        raise LeantrainError(f"{path}: a CSV needs a header and at least two rows")
    header, body = rows[0], rows[1:]
    if cfg.label_column not in header:
        raise LeantrainError(
            f"{path}: no label column {cfg.label_column!r} (data.label_column); columns: "
            f"{bounded_repr(header)}"
        )
    label_at = header.index(cfg.label_column)
    table = _csv_numbers(path, header, body)
    y = _labels(table[:, label_at], str(path))
    x = torch.tensor(np.delete(table, label_at, axis=1), dtype=torch.float64)
    bundle = _array_bundle(x, y, cfg, f"csv {path.name}")
    xt, yt = bundle.train.tensors
    xv, yv = bundle.val.tensors
    standardise = _standardiser(xt)  # tabular features: per column, from the training rows
    bundle.train = TensorDataset(standardise(xt), yt)
    bundle.val = TensorDataset(standardise(xv), yv)
    return bundle


def _standardiser(train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per column: (x - mean) / std of the training rows, as float32. Any finite float64 value
    stays finite: columns are first divided by their largest magnitude (a sum of values near
    1e308 would overflow), and a constant column (or a single row) is centred, not divided
    by zero."""
    scale = train.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)
    mean = (train / scale).mean(0)
    std = (train / scale).std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))

    def standardise(x: torch.Tensor) -> torch.Tensor:
        z = ((x / scale - mean) / std).clamp(-1e6, 1e6)  # a validation outlier stays finite
        return z.float()
    return standardise


def _csv_numbers(path: Path, header: list[str], body: list[list[str]]) -> np.ndarray:
    """The CSV's body as numbers, or one line naming the first row and column that is not a
    finite number (rows counted as in an editor: the header is line 1)."""
    table = np.empty((len(body), len(header)))
    for i, row in enumerate(body):
        line = i + 2
        if len(row) != len(header):
            raise LeantrainError(f"{path}, line {line}: {len(row)} values for {len(header)} "
                                 "columns")
        for j, cell in enumerate(row):
            try:
                value = float(cell)
            except ValueError:
                shown = repr(cell) if cell.strip() else "empty"
                raise LeantrainError(f"{path}, line {line}, column {header[j]!r}: {shown} is "
                                     "not a number") from None
            if not np.isfinite(value):
                raise LeantrainError(f"{path}, line {line}, column {header[j]!r}: {cell} is "
                                     "not a finite number")
            table[i, j] = value
    return table


class ImageFolder(Dataset):
    """Images in class-named subfolders, decoded on access (per-item work: use workers)."""

    def __init__(self, items: list[tuple[Path, int]], size: int | None, channels: int,
                 expected: tuple[int, int] | None = None):
        # expected: the (width, height) every image must have when none is resized
        self.items, self.size, self.channels, self.expected = items, size, channels, expected

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        try:
            with bombs_refused(), Image.open(path) as img:
                if not self.size and self.expected and img.size != self.expected:
                    raise LeantrainError(
                        f"{path} is {img.size[0]}x{img.size[1]} while the other images are "
                        f"{self.expected[0]}x{self.expected[1]}; set data.image_size")
                array = pixels(img, self.channels, self.size)
        except (OSError, *image_bombs()) as exc:  # unidentified, truncated, a bomb
            raise LeantrainError(f"{path} cannot be read as an image: {exc}") from None
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        return tensor, label


def image_bombs() -> tuple[type, ...]:
    """PIL's refusals of an image whose header claims too many pixels (a decompression bomb)."""
    from PIL import Image

    return Image.DecompressionBombError, Image.DecompressionBombWarning


@contextlib.contextmanager
def bombs_refused():
    """PIL only warns about an image of more pixels than its limit (up to twice it): here
    that is refused too, before the image is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", image_bombs()[1])
        yield


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
GRAY_MODES = {"L", "1", "I", "F", "LA", *SIXTEEN_BIT}


def pixels(img, channels: int, size: int | None) -> np.ndarray:
    """An image's pixels as float32 in [0, 1] (H x W, or H x W x 3), resized when `size` is
    set. 16- and 32-bit grayscale keep their range: converting them to 8 bits clipped every
    pixel above 255 to white, and a 16-bit PNG folder trained on blank images."""
    deep = img.mode in SIXTEEN_BIT or img.mode == "I"
    if deep or img.mode == "F":
        img = img.convert("F") if img.mode == "F" else img.convert("I")
        if size:
            img = img.resize((size, size))
        array = np.asarray(img, dtype=np.float64)
        if deep:  # 16-bit sources (PIL may open them as "I"), else the 32-bit range
            array = array / (65535.0 if array.max(initial=0) <= 65535 else 2.0 ** 32 - 1)
        array = np.clip(array, 0.0, 1.0).astype(np.float32)
        return array if channels == 1 else np.repeat(array[..., None], 3, axis=2)
    img = img.convert("L" if channels == 1 else "RGB")
    if size:
        img = img.resize((size, size))
    return np.asarray(img, dtype=np.float32) / 255.0


def check_sample_count(n: int, what: str, split: bool = True) -> None:
    """Refuse a dataset too small to train and validate on, in one line, before any work."""
    if n == 0:
        raise LeantrainError(f"{what}: no samples")
    if split and n < 2:
        raise LeantrainError(f"{what}: 1 sample; training needs at least 2 (one to train on, "
                             "one to validate with)")


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
    if len(classes) == 1:
        raise LeantrainError(f"{train_root}: one class ({shorten(classes[0], 60)}); a "
                             "classifier needs at least 2 class subfolders (one would score "
                             "100% by answering it always)")
    if split:
        extra = sorted(p.name for p in (path / "val").iterdir() if p.is_dir()
                       and p.name not in classes and _scan(path / "val", [p.name]))
        if extra:
            raise LeantrainError(f"{path / 'val'}: class {shorten(extra[0], 60)} has images "
                                 f"but no subfolder in {train_root} ({len(extra)} such); "
                                 "the model cannot learn a class it never sees")
    items = _scan(train_root, classes)
    if not items:
        raise LeantrainError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    from PIL import Image

    sizes, modes = {}, set()
    for file, _ in items[:50]:  # a sample (the rest are checked as they load: ImageFolder)
        try:
            with bombs_refused(), Image.open(file) as img:
                sizes.setdefault(img.size, file)
                modes.add(img.mode)
        except (OSError, *image_bombs()) as exc:
            raise LeantrainError(f"{file} cannot be read as an image: {exc}") from None
    channels = 1 if modes <= GRAY_MODES else 3
    size = cfg.image_size
    if size is None and len(sizes) > 1:
        (a, file_a), (b, file_b) = list(sizes.items())[:2]
        raise LeantrainError(f"{path}: images differ in size ({file_a} is {a[0]}x{a[1]}, "
                             f"{file_b} is {b[0]}x{b[1]}); set data.image_size")
    if split:
        train_items, val_items = items, _scan(path / "val", classes)
        if not val_items:
            raise LeantrainError(f"{path / 'val'}: no images in the class subfolders")
    else:
        check_sample_count(len(items), f"{path}: images")
        train_idx, val_idx = _split(len(items), cfg.val_fraction)
        train_items = [items[i] for i in train_idx.tolist()]
        val_items = [items[i] for i in val_idx.tolist()]
    desc = f"images {path}: {len(train_items)} train / {len(val_items)} val, {len(classes)} classes"
    expected = next(iter(sizes)) if size is None else None
    return DataBundle(ImageFolder(train_items, size, channels, expected),
                      ImageFolder(val_items, size, channels, expected), len(classes), desc)


def from_function(spec: str) -> DataBundle:
    """(train, val) or (train, val, collate_fn) from the user's function; a Hugging Face
    `datasets.Dataset` counts as a Dataset (it has __getitem__ and __len__)."""
    result = call_user(spec, "--data")
    if isinstance(result, DataBundle):
        return result
    datasets = result[:2] if isinstance(result, tuple) else ()
    collate = result[2] if isinstance(result, tuple) and len(result) == 3 else None
    if len(datasets) == 2:
        datasets = tuple(torch_formatted(d, collate) for d in datasets)
        check_datasets(*datasets)
    if not (isinstance(result, tuple) and len(result) in (2, 3)
            and all(_is_dataset(d) for d in datasets)
            and (collate is None or callable(collate))):
        raise LeantrainError(
            f"--data {spec!r} must return (train_dataset, val_dataset) or (train_dataset, "
            f"val_dataset, collate_fn), the datasets map-style (__getitem__ and __len__) or "
            f"streams (an IterableDataset), got {type(result).__name__}")
    return DataBundle(datasets[0], datasets[1], None, f"{spec}: {describe_size(datasets[0])} "
                      f"train / {describe_size(datasets[1])} val", collate)


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, Dataset) or is_stream(obj) or (hasattr(obj, "__getitem__")
                                                          and hasattr(obj, "__len__"))


def check_datasets(train: Any, val: Any) -> None:
    """Streams (no length) are welcome if they start over when iterated again; a generator
    is used up after one pass (one line, before any work)."""
    for role, data in (("training", train), ("validation", val)):
        if is_stream(data):
            check_stream(data, role)


def describe_size(data: Any) -> str:
    return f"a stream ({type(data).__name__})" if is_stream(data) else f"{len(data)}"


def load_data(cfg: DataConfig) -> DataBundle:
    """Dispatch on `cfg.source`: 'digits', a path, or 'pkg.module:fn'."""
    source = cfg.source
    if cfg.context is not None:
        return _text(cfg)
    if source == "digits":
        return digits(cfg)
    path = Path(source)
    if path.exists():
        if is_table(path):
            train, val, classes, collate, description = labelled_table(path, cfg)
            return DataBundle(train, val, classes, description, collate)
        if path.is_dir():
            return image_folder(path, cfg)
        if path.suffix == ".npz":
            return npz(path, cfg)
        if path.suffix == ".csv":
            return csv_table(path, cfg)
        raise LeantrainError(f"data file {path}: unsupported type; use .npz, .csv or a folder")
    if names_code(source):
        return from_function(source)
    raise LeantrainError(f"data path not found: {source}")


def _text(cfg: DataConfig) -> DataBundle:
    """Text for a language model: token shards (a token folder, or the corpus tokenized with
    data.tokenizer), else bytes."""
    if is_token_folder(Path(cfg.source)) or cfg.tokenizer is not None:
        folder = open_token_folder(Path(cfg.source)) if cfg.tokenizer is None else \
            tokenized(cfg.source, cfg.tokenizer, cfg.val_fraction, text_field=cfg.text_field)
        return DataBundle(folder.windows("train", cfg.context), folder.windows("val", cfg.context),
                          folder.vocab_size, f"{folder.describe()}, context {cfg.context}")
    train, val, description = load_text(cfg.source, cfg.context, cfg.val_fraction, cfg.max_bytes)
    return DataBundle(train, val, VOCAB, description)


def names_code(source: str) -> bool:
    """Whether a data source is a "module:function" to import and call (not a path here)."""
    return ":" in source and not source.startswith((".", "/")) and not Path(source).exists()


def code_named_by(model: str | None, source: str, tp_plan: str | None = None
                  ) -> dict[str, str]:
    """The functions a run's config would have leantrain import, by the flag that names them
    ("--model", "--data", TP_PLAN_FLAG); leantrain's own model builders are left out
    (`own_builder`: a function defined in leantrain.recipes, never a name under `leantrain.`
    in general). A run folder's config may come from anyone: what is listed here is imported
    only when the user vouches for it."""
    named = {"--model": model, "--data": source if names_code(source) else None,
             TP_PLAN_FLAG: tp_plan}
    return {flag: spec for flag, spec in named.items() if spec and not own_builder(spec)}
