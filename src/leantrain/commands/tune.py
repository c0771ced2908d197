"""`leantrain tune`: an Optuna study of the recipe (learning rate, schedule, batch size, ...),
scored by time to a target or by a metric, on one machine or many (see `tune.study`)."""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from ..config import check_processes
from ..errors import LeantrainError
from ..tune import DEFAULT_STUDY
from . import common

EXAMPLES = """examples:
  leantrain tune --objective time-to-target --target 'val_accuracy>=0.97' --budget-s 420
  leantrain tune --objective metric --metric val_loss --trial-steps 200 --trials 30
  leantrain tune --objective both --space space.yaml --workers 2 --out runs/tune
  # many machines, one study: run on each
  leantrain tune --storage postgresql://user:pw@db/optuna --study digits --out runs/tune-$HOSTNAME
  optuna-dashboard sqlite:///runs/tune/study.db     # watch it live (pip install optuna-dashboard)
then: leantrain train --config runs/tune/best.yaml --target-acc 0.97
"""
STUDY_DB = "study.db"
DEFAULT_TRIALS = 20  # without a budget


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="hyper-parameter search (Optuna), scored by time to a target",
        description="Run an Optuna study whose trials are real leantrain runs, each in "
                    "DIR/trials/NNNN, and write a ranked table, DIR/tune.json, plots and "
                    "DIR/best.yaml. The study lives in its storage (DIR/study.db by default): "
                    "the same command resumes it.",
        epilog=EXAMPLES, formatter_class=common.RAW)
    common.add_source_args(p)
    p.add_argument("--objective", default="time-to-target",
                   choices=["time-to-target", "metric", "both"],
                   help="time-to-target (default; needs --target), metric (the final "
                        "validation metric), both (metric and training time: a Pareto front)")
    p.add_argument("--target", metavar="METRIC>=X", help="e.g. 'val_accuracy>=0.97'")
    p.add_argument("--metric", metavar="NAME",
                   help="the metric scored (default: the target's, else val_accuracy)")
    p.add_argument("--trials", type=int, metavar="N",
                   help="finished (complete or pruned) trials the study aims for (default: as "
                        f"many as --budget-s allows, else {DEFAULT_TRIALS})")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="wall-clock seconds for this worker, its trials and report included")
    p.add_argument("--trial-steps", type=int, metavar="N",
                   help="each trial's budget in optimizer steps (train.max_steps)")
    p.add_argument("--trial-seconds", type=float, metavar="S",
                   help="each trial's budget in seconds")
    p.add_argument("--space", metavar="FILE",
                   help="YAML: narrow or extend the default space (key: {low, high[, log][, "
                        "int]} or {choices: [...]}; a value fixes a key; null drops it)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna RDB URL shared by the workers (default: sqlite in --out)")
    p.add_argument("--study", metavar="NAME", default=DEFAULT_STUDY,
                   help=f"the study's name in the storage (default {DEFAULT_STUDY})")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="local worker processes on the one storage (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)


def _check(args: argparse.Namespace) -> None:
    for name in ("trials", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise LeantrainError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_processes("--workers", args.workers)
    for name in ("budget_s", "trial_seconds", "trial_steps"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:  # leave it out for no limit
            raise LeantrainError(f"--{name.replace('_', '-')} must be > 0 and finite, got "
                                 f"{value}")
    if args.trial_steps is not None and args.trial_seconds is not None:
        raise LeantrainError("give --trial-steps or --trial-seconds, not both")
    if args.objective != "time-to-target" and args.target:
        raise LeantrainError(f"--target is for --objective time-to-target; {args.objective} "
                             "scores --metric")


def _storage_url(args: argparse.Namespace, out: Path) -> str:
    return args.storage or f"sqlite:///{(out / STUDY_DB).resolve()}"


def _claim_out(args: argparse.Namespace, out: Path) -> None:
    """A new folder, or one holding this study's storage (a resumed study)."""
    if out.exists() and any(out.iterdir()) and args.worker_index == 0 and not (
            (out / STUDY_DB).exists() or args.storage):
        raise LeantrainError(f"{out} is not empty and holds no study ({STUDY_DB}); choose "
                             "another --out, or the folder of the study to resume")
    out.mkdir(parents=True, exist_ok=True)


def worker_command(args: argparse.Namespace, out: Path, storage: str, index: int) -> list[str]:
    """The command line of local worker `index`: this study's arguments, one worker."""
    command = [sys.executable, "-m", "leantrain.cli", "tune", "--recipe", args.recipe,
               "--objective", args.objective, "--pruner", args.pruner, "--storage", storage,
               "--study", args.study,
               "--seed", str(args.seed), "--out", str(out), "--worker-index", str(index),
               "--no-progress"]
    for flag in ("config", "model", "data", "epochs", "device", "target", "metric", "trials",
                 "budget_s", "trial_steps", "trial_seconds", "space"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    for override in args.overrides:
        command += ["--set", override]
    return command


def _task(cfg, bundle, model) -> str:
    """The task a trial's run will have, from one batch through the model."""
    from ..run.plan import build

    return build(cfg, model, bundle.train, bundle.val, measure_loader=False,
                 collate_fn=bundle.collate_fn, evaluates=False).step.task


def _lr_center(args, cfg, bundle, build, space_file) -> float:
    """The LR finder's suggestion, the centre of the default space's LR range; the config's
    LR when the space file sets optim.lr (no sweep then)."""
    from ..bench.lr_finder import find_lr
    from ..tune.space import read_space

    if "optim.lr" in read_space(space_file):
        return cfg.optim.resolved().lr
    result = find_lr(lambda: build(cfg), bundle, cfg)
    common.log.info("LR finder: %.3g (the default space searches a decade either side)",
                    result.suggestion)
    return result.suggestion


def run(args: argparse.Namespace, dist) -> int:
    from ..run.signals import StopRequest

    with StopRequest("after this trial") as stop:  # one signal stops the study, any time
        return _study(args, stop)


def _study(args: argparse.Namespace, stop) -> int:
    from ..data import load_data
    from ..tune.objective import Objective
    from ..tune.report import format_report, write_report
    from ..tune.space import default_space, load_space
    from ..tune.study import StudySpec, open_study, work

    _check(args)
    objective = Objective.parse(args.objective, args.target, args.metric, args.budget_s)
    cfg = common.config_from_args(args)
    # the space file is checked before any work; the LR finder's centre only moves a range
    load_space(args.space, cfg, default_space(cfg, cfg.optim.resolved().lr))
    out = common.default_out(args, "tune")
    bundle = load_data(cfg.data)

    def build(trial_cfg):
        return common.build_model(trial_cfg, bundle)

    # a model that cannot be built, or a metric its runs never report, fails before any trial
    objective = objective.for_task(_task(cfg, bundle, build(cfg)), args.metric is not None)
    _claim_out(args, out)
    storage = _storage_url(args, out)
    lr = _lr_center(args, cfg, bundle, build, args.space) if args.worker_index == 0 \
        else cfg.optim.resolved().lr
    space, fixed = load_space(args.space, cfg, default_space(cfg, lr))
    trials = args.trials if args.trials is not None or args.budget_s else DEFAULT_TRIALS
    spec = StudySpec(cfg, space, fixed, objective, storage, args.study, out, trials,
                     args.budget_s, args.pruner, args.seed, args.trial_steps,
                     args.trial_seconds)
    study = open_study(spec, args.worker_index)
    if args.worker_index > 0:  # a local worker: the space's LR range comes from the study
        saved = study.user_attrs.get("space_lr")
        if saved and "optim.lr" in space:
            low, high, log = saved
            space["optim.lr"] = replace(space["optim.lr"], low=low, high=high, log=log)
        stopped = work(spec, bundle, build, args.worker_index, study, stop)
        return 128 + stopped if stopped else 0
    if "optim.lr" in space:  # the workers search the LR range this worker's finder set
        lr_range = space["optim.lr"]
        study.set_user_attr("space_lr", [lr_range.low, lr_range.high, lr_range.log])
    children = [subprocess.Popen(worker_command(args, out, storage, i))
                for i in range(1, args.workers)]
    stopped = None
    try:
        stopped = work(spec, bundle, build, 0, study, stop)
    except KeyboardInterrupt:
        print(f"leantrain: tune interrupted; the same command resumes study {args.study} "
              f"from {storage}", file=sys.stderr)
        return 130
    finally:
        for child in children:
            if stopped and child.poll() is None:  # (a signal sent to this process alone)
                child.send_signal(signal.SIGTERM)
            child.wait()
    workers = [{"worker": i, "exit_code": c.returncode} for i, c in enumerate(children, 1)]
    report = write_report(study, spec, workers)
    print(format_report(report))
    failed = [w for w in workers if w["exit_code"] != 0]
    if failed:
        print(f"workers that failed: {failed}", file=sys.stderr)
    print(f"\nstudy: {storage} ({args.study}); trials: {out / 'trials'}; report: "
          f"{out / 'tune.json'}")
    if stopped:
        print(f"leantrain: tune stopped by {signal.Signals(stopped).name}; the same command "
              f"continues study {args.study}", file=sys.stderr)
        return 128 + stopped
    return 0
