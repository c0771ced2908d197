"""The plan cache: measured choices kept per model, batch shapes, device and settings.

A decision measured once (`run.defaults` before the run, `run.deciding` on its first steps)
is written here under a key of everything it depends on, so the next run of the same model
starts on it and measures nothing (`plan.cache=false` measures again; `LEANTRAIN_CACHE`
moves the folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..checkpoint import atomic_write_text
from ..config import TrainConfig
from ..env import cache_folder, cpu_model
from ..errors import LeantrainError

log = logging.getLogger(__name__)


def _structure(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_structure(v) for v in value]
    return type(value).__name__


def cache_key(cfg: TrainConfig, model: nn.Module, sample: Any, device: torch.device,
              collate_fn) -> str:
    """What the decisions depend on: model structure, batch shapes and dtypes, the device,
    versions, and the settings that shape a step."""
    facts = {
        "model": [(name, type(m).__name__) for name, m in model.named_modules()],
        "parameters": [(name, list(p.shape), str(p.dtype)) for name, p in
                       model.named_parameters()],
        "sample": _structure(sample),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "versions": [torch.__version__, __version__],
        "plan": cfg.to_dict()["plan"], "batch_size": cfg.data.batch_size,
        "loader": cfg.data.loader, "optimizer": cfg.optim.name, "task": cfg.train.task,
        "collate_fn": getattr(collate_fn, "__qualname__", type(collate_fn).__name__),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def cache_file(key: str) -> Path:
    return cache_folder() / "plans" / f"{key}.json"


def read(key: str) -> dict[str, Any] | None:
    path = cache_file(key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("values"), dict) \
        else None


def write(key: str, record: dict[str, Any]) -> None:
    """Keep a measurement for the next run; a cache that cannot be written (a read-only
    $HOME, common on clusters) costs the next run a measurement, not this one its result."""
    path = cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2))
    except (OSError, LeantrainError) as exc:
        log.warning("plan cache %s not written (%s): the next run measures again; set "
                    "LEANTRAIN_CACHE to a writable folder to keep it", path.parent,
                    getattr(exc, "strerror", None) or exc)


