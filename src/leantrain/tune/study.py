"""A `leantrain tune` study: Optuna's sampler, pruner and RDB storage; every trial a real
leantrain run (`run.fit`, the plan and code path of `train`) in its own folder.

The storage is what makes a study durable and shareable: an SQLite file in the study's folder
by default (a study killed at any point resumes from it, no finished trial lost or repeated),
or any Optuna RDB URL (PostgreSQL, MySQL) that workers on several machines share. Each worker
sends a heartbeat while its trial runs; a worker that dies leaves its trial RUNNING only until
the grace period passes, then the next trial to start on the storage marks it FAIL.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import LeantrainError, one_line
from ..measure import clock, deadline, load
from ..measure.clock import process_age
from ..run.signals import Stopped, StopRequest
from . import DEFAULT_STUDY
from .objective import Objective
from .space import Param, trial_config

log = logging.getLogger(__name__)

HEARTBEAT_S, GRACE_S = 5, 20  # a dead worker's trial is failed ~20 s after its last beat
PRUNERS = ("median", "hyperband", "none")
FINISHED = ("COMPLETE", "PRUNED")  # the states that count towards --trials
STORAGE_ATTEMPTS = 5
# kept back for the report and plots after the last trial: this share of the budget, or
# REPORT_RESERVE_S on a quiet machine, as many times more as it is slower now (measure.load)
BUDGET_RESERVE, REPORT_RESERVE_S = 0.03, 2.0
# a trial stopped by the study's deadline evaluates and writes its run after: it is asked to
# stop this long before (times the slowdown), and interrupted at the deadline itself
FINISH_RESERVE_S = 2.0


@dataclass
class StudySpec:
    """Everything a worker needs to run trials of one study."""

    base: TrainConfig
    space: dict[str, Param]
    fixed: dict[str, Any]
    objective: Objective
    storage: str
    name: str
    out: Path
    trials: int | None = 20  # None: as many as the budget allows
    budget_s: float | None = None
    pruner: str = "median"
    seed: int = 0
    trial_steps: int | None = None
    trial_seconds: float | None = None
    started: float = field(default_factory=lambda: process_start())

    def deadline(self) -> float | None:
        """When the trials must end (on `clock.now()`), the report's time kept back."""
        if self.budget_s is None:
            return None
        reserve = max(BUDGET_RESERVE * self.budget_s, REPORT_RESERVE_S * load.slowdown())
        return self.started + self.budget_s - reserve

    def wind_down(self) -> float | None:
        """From when no trial starts and a running one is asked to stop: its run's final
        evaluation and files then fit before the deadline."""
        ends = self.deadline()
        return None if ends is None else ends - FINISH_RESERVE_S * load.slowdown()


def process_start() -> float:
    """When this process started, on `clock.now()`: a worker's budget counts its
    interpreter, torch and data start-up too."""
    return clock.now() - process_age()


@functools.cache
def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_for(url: str):
    """Optuna's RDB storage at `url`, with heartbeats; SQLite waits for its lock (several
    local workers write to one file) instead of failing at once."""
    optuna = _optuna()
    from sqlalchemy.exc import IntegrityError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                              heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
        except IntegrityError:
            # workers that start together on a new database race to create its tables: the
            # loser finds them made on its next try
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise
            time.sleep(0.5 * (attempt + 1))
        except Exception as exc:  # a bad URL, a server that does not answer, a missing driver
            raise LeantrainError(f"--storage {url}: cannot open it: {one_line(exc)}") \
                from exc


def _pruner(name: str, spec: StudySpec):
    optuna = _optuna()
    if name == "median":  # below the median of earlier trials at the same evaluation (steps
        # count evaluations from 1: the first, often noisy, is never pruned on)
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1,
                                              max_resource=max(spec.base.train.epochs, 2))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise LeantrainError(f"--pruner {name!r}: allowed {', '.join(PRUNERS)}")


def open_study(spec: StudySpec, worker: int = 0):
    """Create the study on its storage, or load it to resume or join it."""
    optuna = _optuna()
    pruner = _pruner(spec.pruner, spec)
    if len(spec.objective.directions) > 1 and spec.pruner != "none":
        log.info("a two-objective study is not pruned (Optuna prunes single objectives only)")
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=storage_for(spec.storage), study_name=spec.name, load_if_exists=True,
        directions=spec.objective.directions, pruner=pruner,
        sampler=optuna.samplers.TPESampler(seed=spec.seed + worker))
    if [d.name.lower() for d in study.directions] != spec.objective.directions:
        raise LeantrainError(f"study {spec.name!r} on {spec.storage} was created with other "
                             f"objectives; give another --study name")
    # a process joining or resuming a study draws from a stream of its own: seeded alike, a
    # resumed study would repeat the trials it already has, parameter for parameter
    known = len(study.get_trials(deepcopy=False))
    if known:
        study.sampler = optuna.samplers.TPESampler(seed=spec.seed + worker + 7919 * known)
    if study.user_attrs.get("objective") not in (None, spec.objective.kind):
        raise LeantrainError(f"study {spec.name!r} was created with --objective "
                             f"{study.user_attrs['objective']}; resume it with the same")
    study.set_user_attr("objective", spec.objective.kind)
    return study


class TrialWatcher:
    """Reports each validation to Optuna (which may prune the trial) and ends the trial's run
    at `ends` (the study's wind-down) or the trial's own time budget (`run.records.Watcher`),
    at a step's boundary."""

    def __init__(self, trial, objective: Objective, ends: float | None,
                 trial_seconds: float | None):
        self.trial, self.objective = trial, objective
        self.start = clock.now()
        self.deadline = ends
        if trial_seconds is not None:
            own = self.start + trial_seconds
            self.deadline_is_budget = ends is None or own < ends
            self.deadline = min(own, ends) if ends is not None else own
        else:
            self.deadline_is_budget = False
        self.evaluations, self.best_gap, self.cut = 0, None, False

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        optuna = _optuna()
        self.evaluations += 1
        if self.objective.target is not None:
            gap = self.objective.gap(metrics)
            if gap is not None and (self.best_gap is None or gap < self.best_gap):
                self.best_gap = gap
        value = self.objective.intermediate(metrics)
        if value is None or len(self.objective.directions) > 1:
            return
        self.trial.report(value, self.evaluations)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at evaluation {self.evaluations}: {value:.4g}")

    def stop_reason(self) -> str | None:
        if self.deadline is None or clock.now() < self.deadline:
            return None
        if self.deadline_is_budget:
            return "the trial's time budget (--trial-seconds) ran out"
        self.cut = True
        return "the study's budget ran out"

    def seconds(self) -> float:
        return clock.now() - self.start


def trial_folder(spec: StudySpec, number: int) -> Path:
    """out/trials/NNNN for the default study; another study in the same folder (--study
    NAME) keeps its runs in out/trials/NAME/NNNN: two studies once shared trials/0000."""
    trials = spec.out / "trials"
    return (trials if spec.name == DEFAULT_STUDY else trials / _safe(spec.name)) / \
        f"{number:04d}"


def _safe(name: str) -> str:
    """A study name as one folder name."""
    kept = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return kept[:100] or "study"


def run_trial(trial, spec: StudySpec, bundle, build_model: Callable[[TrainConfig], Any]
              ) -> list[float]:
    """One trial: draw its values, train a real run in out/trials/NNNN, score it."""
    from ..run.fit import fit

    optuna = _optuna()
    values = {key: param.suggest(trial) for key, param in spec.space.items()}
    extra: dict[str, Any] = {}
    if spec.objective.kind == "time-to-target":
        name, op, value = spec.objective.target
        extra = {"train.target": f"{name}{op}{value:g}", "train.target_acc": None}
    if spec.trial_steps is not None:
        extra["train.max_steps"] = spec.trial_steps
    cfg = trial_config(spec.base, {**spec.fixed, **values, **extra})
    folder = trial_folder(spec, trial.number)
    trial.set_user_attr("run", str(folder))
    ends = spec.deadline()
    watcher = TrialWatcher(trial, spec.objective, spec.wind_down(), spec.trial_seconds)
    evals_planned = max(1, cfg.train.epochs // cfg.train.eval_every_epochs)
    try:  # interrupted at the study's deadline whatever it is doing (a compile, a slow eval)
        with deadline.until(ends) if ends is not None else contextlib.nullcontext():
            summary = fit(build_model(cfg), bundle.train, bundle.val, cfg, folder,
                          progress_bar=False, collate_fn=bundle.collate_fn, watcher=watcher)
    except deadline.BudgetSpent:
        trial.set_user_attr("cut", "the study's budget ran out mid-trial (interrupted; its "
                                   "last checkpoint is in its run folder)")
        trial.set_user_attr("seconds", watcher.seconds())
        raise optuna.TrialPruned("cut: the study's budget ran out") from None
    except Stopped as exc:  # a signal in the trial's run: its checkpoint is written; the
        trial.set_user_attr("error", f"interrupted: {exc}")  # study stops after it
        trial.set_user_attr("interrupted", exc.exit_code - 128)
        raise
    except optuna.TrialPruned:
        per_eval = watcher.seconds() / max(watcher.evaluations, 1)
        trial.set_user_attr("pruned_after_evaluations", watcher.evaluations)
        trial.set_user_attr("seconds", watcher.seconds())
        trial.set_user_attr("seconds_saved_estimate",
                            max(0, evals_planned - watcher.evaluations) * per_eval)
        raise
    except Exception as exc:
        trial.set_user_attr("error", one_line(exc))
        raise
    trial.set_user_attr("seconds", watcher.seconds())
    trial.set_user_attr("train_seconds", summary["train_seconds"])
    trial.set_user_attr("epochs_run", summary["epochs"])
    trial.set_user_attr("stop_reason", summary.get("stop_reason"))
    for key in ("val_accuracy", "val_loss", "time_to_target_seconds"):
        trial.set_user_attr(key, summary.get(key))
    if watcher.cut and summary.get("time_to_target_seconds") is None:
        trial.set_user_attr("cut", "the study's budget ran out mid-trial")
        raise optuna.TrialPruned("cut: the study's budget ran out")
    try:
        return spec.objective.values(summary, watcher.best_gap)
    except Exception as exc:  # recorded like a failed run's: tune.json says why
        trial.set_user_attr("error", one_line(exc))
        raise


def finished_trials(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED)


def work(spec: StudySpec, bundle, build_model: Callable[[TrainConfig], Any],
         worker: int = 0, study=None, stop: StopRequest | None = None) -> int | None:
    """Run trials on the study until it has `spec.trials` finished ones or the budget ends.
    A trial that raises is recorded FAIL with its error, and the study goes on. `study`: the
    one `open_study` gave this worker (opened here when None).

    One SIGTERM or SIGINT stops the study: in a trial's run, the run writes its checkpoint and
    the trial is recorded interrupted; between trials, once the current one ends. Returns the
    signal's number then (the same command continues the study), else None. `stop`: the
    command's own, installed since it started (one signal before the first trial counts)."""
    optuna = _optuna()
    study = study if study is not None else open_study(spec, worker)
    if spec.trials is not None and finished_trials(study) >= spec.trials:
        log.info("study %s already has %d finished trials", spec.name, spec.trials)
        return None
    ends = spec.wind_down()
    timeout = None if ends is None else max(0.0, ends - clock.now())

    def tell(study, trial) -> None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in trial.params.items())
        if trial.state.name == "COMPLETE":
            outcome = ", ".join(f"{n} {v:.4g}" for n, v in zip(spec.objective.names,
                                                                trial.values, strict=True))
        else:
            outcome = trial.user_attrs.get("error") or trial.user_attrs.get("cut") or ""
        log.info("trial %d %s %s (%s)", trial.number, trial.state.name.lower(), outcome, shown)

    owned, interrupted = stop is None, []
    stop = StopRequest("after this trial") if owned else stop

    def halt(study, trial) -> None:  # (a signal inside a trial's run: that run raised Stopped)
        signum = trial.user_attrs.get("interrupted") or stop.signum
        if signum:
            interrupted.append(signum)
            study.stop()

    def trial_or_stop(trial) -> list[float]:
        if stop.requested:  # (the signal came between two trials)
            trial.set_user_attr("interrupted", stop.signum)
            raise Stopped(f"stopped by {signal.Signals(stop.signum).name} before the trial "
                          "started", stop.signum)
        return run_trial(trial, spec, bundle, build_model)

    callbacks = [tell, halt]
    if spec.trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(spec.trials, states=tuple(
            getattr(optuna.trial.TrialState, s) for s in FINISHED)))
    run_log = logging.getLogger("leantrain.run")
    level = run_log.level
    run_log.setLevel(max(level, logging.WARNING))  # a line per trial, not one per epoch
    try:
        with stop if owned else contextlib.nullcontext():
            study.optimize(trial_or_stop, timeout=timeout, catch=(Exception,),
                           gc_after_trial=True, callbacks=callbacks)
    finally:
        run_log.setLevel(level)
    return interrupted[0] if interrupted else None
