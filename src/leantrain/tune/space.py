"""The search space of `leantrain tune`: which config keys a trial varies, and over what.

A space maps dotted config keys to a range, `{low: A, high: B}` (with `log: true` for a
log-uniform draw, `int: true` for whole numbers) or `{choices: [...]}`. The default space
holds the recipe knobs that decide how many steps a model needs; a YAML file (`--space`)
narrows or extends it: an entry replaces the default range of its key or adds a key (any
config key a trial may change), a plain value fixes the key for every trial, and null drops
the key from the search (the config's value stays).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PLAN_FILE_KEYS, TrainConfig, config_from_dict, merge, nest, read_yaml
from ..errors import LeantrainError, shorten

RANGE_KEYS = {"low", "high", "log", "int", "choices"}
# the data are loaded once for a study: a trial may change how they are batched, not which
SEARCHABLE_DATA_KEYS = PLAN_FILE_KEYS["data"]
# every shape benchmarks/schedules.py found to win somewhere (constant: the default)
SCHEDULES = ("constant", "wsd", "cosine", "onecycle")


@dataclass(frozen=True)
class Param:
    """One searched key: a numeric range or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial) -> Any:
        """This trial's value, drawn by its Optuna sampler."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def extremes(self) -> list[Any]:
        """Values that together check the key and its type against the config."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.key} in {list(self.choices)}"
        kind = "int " if self.integer else ""
        return f"{self.key}: {kind}{self.low:g} to {self.high:g}" + (" (log)" if self.log else "")


def default_space(cfg: TrainConfig, lr_center: float) -> dict[str, Param]:
    """Learning rate log-uniform over a decade either side of `lr_center` (the LR finder's
    suggestion), SGD momentum, weight decay, warm-up share, schedule, batch size (halved to
    quadrupled) and epochs (a quarter to all of the config's; with a target the run stops
    when it is met, and the schedule is fitted to the epochs)."""
    batch, epochs = cfg.data.batch_size, cfg.train.epochs
    space = [
        Param("optim.lr", lr_center / 10, lr_center * 10, log=True),
        Param("optim.weight_decay", 1e-6, 1e-2, log=True),
        Param("schedule.name", choices=SCHEDULES),
        Param("schedule.warmup_fraction", 0.0, 0.4),
        Param("data.batch_size", choices=tuple(sorted({max(1, batch // 2), batch, batch * 2,
                                                       batch * 4}))),
        Param("train.epochs", max(1, epochs // 4), max(2, epochs), integer=True),
    ]
    if cfg.optim.name == "sgd":
        space.append(Param("optim.momentum", 0.8, 0.99))
    return {p.key: p for p in space}


def _param(key: str, entry: dict[str, Any], where: str) -> Param:
    unknown = set(entry) - RANGE_KEYS
    if unknown:
        raise LeantrainError(f"{where}: {key}: unknown field(s) {', '.join(sorted(unknown))}; "
                             f"allowed: {', '.join(sorted(RANGE_KEYS))}")
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise LeantrainError(f"{where}: {key}: choices must be a non-empty list")
        return Param(key, choices=tuple(choices))
    if "low" not in entry or "high" not in entry:
        raise LeantrainError(f"{where}: {key}: give low and high, or choices")
    low, high = entry["low"], entry["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise LeantrainError(f"{where}: {key}: low and high must be numbers, got {low!r} and "
                             f"{high!r}")
    if not low < high:
        raise LeantrainError(f"{where}: {key}: empty range, low {low!r} must be below high "
                             f"{high!r}")
    log, integer = bool(entry.get("log", False)), bool(entry.get("int", False))
    if log and low <= 0:
        raise LeantrainError(f"{where}: {key}: a log range needs low > 0, got {low!r}")
    kind = int if integer else float
    return Param(key, kind(low), kind(high), log=log, integer=integer)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': {...}}} and {'optim.lr': {...}} alike -> {'optim.lr': {...}}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        is_section = isinstance(value, dict) and not (set(value) & RANGE_KEYS) and value
        flat.update(_flatten(value, f"{name}.") if is_section else {name: value})
    return flat


def check_key(key: str, values: list[Any], base: TrainConfig, where: str) -> None:
    """`key` exists, may be searched, and takes each of `values` (the config's own checks)."""
    section = key.split(".", 1)[0]
    if "." not in key:
        raise LeantrainError(f"{where}: {key}: not a searchable key (give section.key, e.g. "
                             "optim.lr)")
    if section == "data" and key.split(".", 1)[1] not in SEARCHABLE_DATA_KEYS:
        raise LeantrainError(f"{where}: {key}: the data are loaded once per study; of data.*, "
                             f"a trial may change {', '.join(SEARCHABLE_DATA_KEYS)}")
    for value in values:
        try:
            config_from_dict(merge(base.to_dict(), nest(key, value)))
        except LeantrainError as exc:
            raise LeantrainError(f"{where}: {key}: {exc}") from exc


def _check_exists(key: str, base: TrainConfig, where: str) -> None:
    held: Any = base.to_dict()
    for part in key.split("."):
        if not isinstance(held, dict) or part not in held:
            raise LeantrainError(f"{where}: {shorten(key, 80)}: no config has this key (a "
                                 "null entry stops searching a key of the config)")
        held = held[part]


def read_space(path: str | Path | None) -> dict[str, Any]:
    """The --space file's entries by dotted key ({} without a file)."""
    return _flatten(read_yaml(path)) if path else {}


def load_space(path: str | Path | None, base: TrainConfig, defaults: dict[str, Param]
               ) -> tuple[dict[str, Param], dict[str, Any]]:
    """(searched keys, fixed keys) from the default space and the --space file at `path`."""
    space, fixed = dict(defaults), {}
    where = f"--space {path}"
    given = read_space(path)
    for key, entry in given.items():
        if entry is None:  # `key: null`: not searched (a key no config has is a typo)
            _check_exists(key, base, where)
            space.pop(key, None)
        elif isinstance(entry, dict):
            space[key] = _param(key, entry, where)
        else:
            space.pop(key, None)
            fixed[key] = entry
    for key, param in space.items():
        check_key(key, param.extremes(), base, where if key in given else "default space")
    for key, value in fixed.items():
        check_key(key, [value], base, where)
    if not space:
        raise LeantrainError(f"{where}: nothing left to search")
    return space, fixed


def trial_config(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """The base config with a trial's (and the fixed) values set."""
    merged = base.to_dict()
    for key, value in values.items():
        merged = merge(merged, nest(key, value))
    return config_from_dict(merged)
