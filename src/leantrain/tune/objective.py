"""What a `leantrain tune` trial is scored by.

- time-to-target: the training seconds until the target (`val_accuracy>=0.97`) was first
  met, minimised. A trial that misses scores after every trial that hit: the miss base (the
  study's budget, else an hour) times 1 + its relative shortfall at its best evaluation, so
  of two misses the one that got closer ranks first.
- metric: the run's final validation metric (maximised for accuracies, minimised for losses,
  errors and perplexities), within the trial's budget of steps or seconds.
- both: the metric and the training seconds, a two-objective study whose answer is the
  Pareto front (no trial both better and faster).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..config import parse_target
from ..errors import LeantrainError
from ..losses import tasks

KINDS = ("time-to-target", "metric", "both")
MISS_BASE_S = 3600.0  # a missed target scores after any hit, when the study has no budget


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


def reported_metrics(task: str) -> list[str]:
    """The validation figures a run of `task` reports, its metric first."""
    metric = tasks.METRIC.get(task)
    return [*([f"val_{metric}"] if metric else []), "val_loss"]


def default_metric(task: str) -> str:
    return reported_metrics(task)[0]


@dataclass(frozen=True)
class Objective:
    kind: str
    metric: str
    target: tuple[str, str, float] | None = None
    miss_base_s: float = MISS_BASE_S

    @classmethod
    def parse(cls, kind: str, target: str | None, metric: str | None,
              budget_s: float | None) -> Objective:
        if kind not in KINDS:
            raise LeantrainError(f"--objective {kind!r}: allowed {', '.join(KINDS)}")
        parsed = parse_target(target) if target else None
        if kind == "time-to-target" and parsed is None:
            raise LeantrainError("--objective time-to-target needs --target, e.g. "
                                 "--target 'val_accuracy>=0.97'")
        metric = metric or (parsed[0] if parsed else "val_accuracy")
        return cls(kind, metric, parsed, budget_s or MISS_BASE_S)

    def for_task(self, task: str, metric_given: bool) -> Objective:
        """This objective checked against what a run of `task` reports, before any trial: the
        metric defaults to the task's own (MAE for a regression, the loss where the task has
        no metric), and a metric or target the runs would never report is one line."""
        reported = reported_metrics(task)
        metric = self.metric if metric_given or self.target else default_metric(task)
        for name in {metric, *([self.target[0]] if self.target else [])}:
            if name not in reported:
                raise LeantrainError(f"{name!r} is not reported by a {task} run; choose "
                                     f"--metric or --target among {', '.join(reported)}")
        return replace(self, metric=metric)

    @property
    def directions(self) -> list[str]:
        metric = "maximize" if higher_is_better(self.metric) else "minimize"
        return {"time-to-target": ["minimize"], "metric": [metric],
                "both": [metric, "minimize"]}[self.kind]

    @property
    def names(self) -> list[str]:
        return {"time-to-target": ["seconds_to_target"], "metric": [self.metric],
                "both": [self.metric, "train_seconds"]}[self.kind]

    def gap(self, metrics: dict[str, float]) -> float | None:
        """How far `metrics` are from the target, relative to it (0 when met)."""
        name, op, value = self.target
        if metrics.get(name) is None:
            return None
        short = value - metrics[name] if op.startswith(">") else metrics[name] - value
        return max(0.0, short) / max(abs(value), 1e-12)

    def intermediate(self, metrics: dict[str, float]) -> float | None:
        """The value a pruner compares across trials at the same evaluation, in the study's
        (first) direction: the gap to the target, or the metric."""
        return self.gap(metrics) if self.kind == "time-to-target" else metrics.get(self.metric)

    def values(self, summary: dict[str, Any], best_gap: float | None) -> list[float]:
        """The trial's objective values from its run summary (`best_gap`: the smallest gap to
        the target over its evaluations)."""
        if self.kind == "time-to-target":
            if summary.get("time_to_target_seconds") is not None:
                return [summary["time_to_target_seconds"]]
            return [self.miss_base_s * (1 + (1.0 if best_gap is None else best_gap))]
        metric = summary.get(self.metric)
        if metric is None:
            known = [k for k, v in summary.items() if k.startswith("val_") and v is not None]
            raise LeantrainError(f"the runs report no {self.metric}; choose --metric among "
                                 f"{', '.join(known)}")
        return [metric] if self.kind == "metric" else [metric, summary["train_seconds"]]
