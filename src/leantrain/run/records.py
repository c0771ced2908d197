"""What a training run reports as it goes: the training record at log steps and epoch ends,
validation (and the time to the target), and what a watcher sees of it.

Each record is a host sync, so the loop asks for one only at log points, evaluations and
epoch ends; the finite check of the training loss rides on the same sync.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml
from tqdm import tqdm

from ..checkpoint import atomic_write_text
from ..config import CONFIG_NAME, TrainConfig, target_met, target_of
from ..data.batching import batches_per_epoch
from ..losses import tasks
from ..measure.monitor import ResourceMonitor
from ..measure.timing import DATA_WAIT_WARNING, StepTimer
from . import finite, pipelined, step, summary
from . import state as run_state
from .logs import NullLog, RunLog, start_monitor
from .plan import Run
from .state import TrainState

log = logging.getLogger(__name__)


class Watcher(Protocol):
    """What a caller driving many runs (a tuning study) sees of one, and how it ends it."""

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """After each validation; may raise to abandon the run (a pruned trial)."""

    def stop_reason(self) -> str | None:
        """After each optimizer step: a reason to end the run now (its summary is still
        written), or None."""


def write_config(out_dir: Path, cfg: TrainConfig) -> None:
    """The run folder's config.yaml: what the run trains with, and what `--resume` continues
    with (rewritten when the run's first steps decide a choice: `run.deciding`)."""
    atomic_write_text(out_dir / CONFIG_NAME, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


class Records:
    """The run's records, written to its log (metrics.jsonl, TensorBoard) when it has one."""

    def __init__(self, run: Run, last_good: Callable[[], str], watcher: Watcher | None = None,
                 evaluating: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.run, self.last_good, self.watcher = run, last_good, watcher
        self.log_file: RunLog | NullLog = NullLog()
        self.monitor: ResourceMonitor | None = None
        self.target, self.evaluated_at = target_of(run.cfg), -1
        self.data_wait_warned = False
        # the plan validation runs on: while the first steps decide it (`run.deciding`), the
        # current one, never a candidate's (its one-off kernels for the validation's shapes)
        self.evaluating = evaluating or contextlib.nullcontext

    def open(self, out_dir: Path | None, step: Callable[[], int]) -> None:
        """In `out_dir` (rank 0 writes): config.yaml, what the run trains with, and the
        metric log; the resource monitor samples into the log at `step()`."""
        if out_dir is not None and self.run.dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(out_dir, self.run.cfg)
            self.log_file = RunLog(out_dir)
        self.monitor = start_monitor(self.run, lambda sample: self.log_file.log(
            "monitor", step(), **sample))

    def stop_reason(self, step: int) -> str | None:
        """Why the run stops after optimizer step `step`: train.max_steps reached, or the
        watcher's reason (a tune pruner); None to go on."""
        max_steps = self.run.cfg.train.max_steps
        if max_steps is not None and step >= max_steps:
            return f"train.max_steps ({max_steps}) reached"
        return self.watcher.stop_reason() if self.watcher is not None else None

    def close(self) -> dict[str, Any] | None:
        """Stop the monitor and close the log; returns the monitor's summary."""
        if self.monitor:
            self.monitor.stop()
        self.log_file.close()
        return self.monitor.summary() if self.monitor else None

    def bar(self, epoch: int, start: int, shown: bool) -> tqdm:
        """The epoch's progress bar from batch `start` (on rank 0, where `shown`)."""
        return tqdm(total=batches_per_epoch(self.run.train_loader), initial=start,
                    desc=f"epoch {epoch + 1}/{self.run.cfg.train.epochs}",
                    disable=None if shown and self.run.dist.is_main else True, leave=False,
                    unit="batch")

    def train(self, state: TrainState) -> dict[str, float]:
        """The epoch's training loss and metric so far; a non-finite loss stops the run."""
        loss_sum, metric_sum, n = run_state.epoch_totals(state, self.run)
        finite.check_loss(loss_sum, state.progress.step, self.last_good())
        record = {"loss": loss_sum / max(n, 1)}
        metric = tasks.METRIC.get(self.run.step.task)
        if metric:
            record[metric] = metric_sum / max(n, 1)
        return record

    def log_train(self, state: TrainState, bar) -> None:
        # float(): torchao's low-bit optimizers keep the LR as a tensor (no recompiles)
        p, lr = state.progress, float(state.optimizer.param_groups[0]["lr"])
        record = self.train(state)
        self.log_file.log("train", p.step, epoch=p.epoch, **record, lr=lr)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}")

    def evaluate(self, state: TrainState, seconds: Callable[[], float]) -> dict[str, float]:
        """Validation metrics now; records the time to the target (`seconds()` of training,
        this evaluation included) when it is first met, and shows the metrics to the
        watcher."""
        run, p = self.run, state.progress
        with self.evaluating():
            found = step.metrics(run.model, run.val_loader, run.step) if run.pipeline is None \
                else pipelined.metrics(run.pipeline, run.val_loader, run.step)
        p.val_accuracy, p.val_loss, p.val_mae = (found[k] for k in
                                                 ("val_accuracy", "val_loss", "val_mae"))
        p.val_task_loss, p.val_aux_loss = found.get("val_task_loss"), found.get("val_aux_loss")
        self.evaluated_at = p.step
        if p.time_to_target is None and target_met(self.target, found):
            p.time_to_target = seconds()
            p.stop_reason = f"target {self.target[0]}{self.target[1]}{self.target[2]:g} met"
        found = {k: v for k, v in found.items() if v is not None}
        if self.watcher is not None:
            self.watcher.evaluated(p.step, found)
        return found

    def end_epoch(self, state: TrainState, epoch: int, seconds: Callable[[], float],
                  timer: StepTimer) -> None:
        """The epoch's record, validated when it is due (and not already at this step)."""
        p, train = state.progress, self.run.cfg.train
        record = {"epoch": epoch + 1,
                  **{f"train_{k}": v for k, v in self.train(state).items()}}
        last = epoch + 1 == train.epochs or p.stop_reason is not None
        if ((epoch + 1) % train.eval_every_epochs == 0 or last) and self.evaluated_at != p.step:
            record.update(self.evaluate(state, seconds))
        if epoch == 0:
            self._warn_data_wait(timer)  # after the first epoch, not only at the end of a run
        self.log_file.log("epoch", p.step, **record)
        log.info("epoch %d: %s", epoch + 1,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))

    def _warn_data_wait(self, timer: StepTimer) -> None:
        breakdown = summary.step_breakdown(timer, self.run)
        if breakdown and "advice" in breakdown and not self.data_wait_warned:
            self.data_wait_warned = True
            log.warning("waiting for data takes %.0f%% of each step (over %.0f%%); try: %s",
                        100 * breakdown["fractions"]["data"], 100 * DATA_WAIT_WARNING,
                        breakdown["advice"])
