"""Which parallel layout of a launch trains this model fastest here: `bench --layouts N`.

The candidates for a launch of N processes: DDP; FSDP2; tensor parallel over 2 (and over N)
when the model has a plan (`tensor_parallel.layer_plan`); pipeline stages over 2 (and over
N), 1F1B, when it has one list of blocks (`pipeline.check`). Each keeps the run's global
batch: a tensor-parallel group of k sees one batch of k x data.batch_size, a pipeline of k
stages takes k x plan.grad_accum micro-batches of data.batch_size.

Each is priced per rank first (`memory_estimate.estimate` with its `Layout`, the figures of
`doctor --ranks N`): one that would not fit the device is listed with its estimated peak
and not run. The others run as real jobs, `leantrain launch --nproc N -- train` of `steps`
steps on the run's own config, in interleaved rounds (`measure.rounds`). A job's rate is its
global samples/s (the run's own steady-state figure, summary.json); a layout's speed-up over
the reference (DDP, or FSDP2 where DDP does not fit) is the median of per-round ratios with
its 95% bootstrap interval, and it wins only when that interval lies above 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .. import pipeline, tensor_parallel
from ..checkpoint import atomic_write_text
from ..config import ParallelConfig, TrainConfig, config_from_dict, merge
from ..data import DataBundle
from ..data.streams import is_stream
from ..errors import LeantrainError, one_line
from ..measure.rounds import interleave, interval, paired_ratios
from .memory_estimate import Layout, estimate

LAYOUTS_JSON = "layouts.json"


@dataclass
class Candidate:
    name: str  # "ddp", "fsdp", "tp=2", "pp=2"
    settings: dict[str, Any]  # config keys (dotted) that make the layout
    layout: Layout
    peak_bytes: int | None = None  # the estimate's training peak of its fullest rank
    fits: bool | None = None
    failed: str | None = None  # why it was not run, or why its job failed
    rates: list[float] = field(default_factory=list)  # global samples/s, one per round
    speedup: float | None = None  # median ratio to the reference, round by round
    interval: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "layout": self.layout.describe(),
                "estimated_peak_bytes": self.peak_bytes, "fits": self.fits,
                "failed": self.failed, "global_samples_per_second": self.rates,
                "speedup": self.speedup, "speedup_interval": self.interval}


def candidates(model: nn.Module, cfg: TrainConfig, nproc: int) -> list[Candidate]:
    """The layouts of `nproc` processes, each keeping the global batch; one the model or the
    processes cannot take (no tensor-parallel plan, too few blocks, N not a multiple of the
    degree) is listed with the reason and not run."""
    batch, accum = cfg.data.batch_size, cfg.plan.grad_accum
    found = [Candidate("ddp", {"plan.distributed": "ddp"}, Layout(nproc, "ddp")),
             Candidate("fsdp", {"plan.distributed": "fsdp"}, Layout(nproc, "fsdp"))]
    for k in sorted({2, nproc}):
        tp = Candidate(f"tp={k}", {"plan.parallel.tp": k, "data.batch_size": batch * k,
                                   "plan.distributed": "auto"}, Layout(nproc, "fsdp", tp=k))
        pp = Candidate(f"pp={k}", {"plan.parallel.pp": k, "plan.grad_accum": k * accum,
                                   "plan.parallel.pp_schedule": "1f1b",
                                   "plan.distributed": "auto"},
                       Layout(nproc, "fsdp" if nproc > k else "pp", pp=k,
                              microbatches=k * accum))
        if nproc % k:
            tp.failed = pp.failed = f"{nproc} processes are not a multiple of {k}"
            found += [tp, pp]
            continue
        try:
            tp.layout = replace(tp.layout, split=tensor_parallel.split_share(model, k))
        except LeantrainError as exc:
            tp.failed = str(exc)
        try:
            pipeline.check(model, k, "1f1b", k * accum)
        except LeantrainError as exc:
            pp.failed = str(exc)
        found += [tp, pp]
    return found


def _settings_tree(settings: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def price(candidate: Candidate, build_model: Callable[[], nn.Module], bundle: DataBundle,
          cfg: TrainConfig) -> None:
    """The candidate's fullest rank, from a one-process probe of its micro-batch."""
    if candidate.failed is not None:
        return
    probe = merge(cfg.to_dict(), _settings_tree(candidate.settings))
    probe = merge(probe, {"plan": {"distributed": "auto", "parallel": {"tp": 1, "pp": 1}}})
    est = estimate(build_model, bundle, config_from_dict(probe), layout=candidate.layout)
    candidate.peak_bytes = est.per_rank["training_peak_bytes"]
    candidate.fits = est.per_rank["fits"]
    if candidate.fits is False:
        candidate.failed = (f"would not fit: {candidate.peak_bytes / 2**20:,.1f} MiB per rank "
                            f"estimated, over the device's {est.room_bytes / 2**20:,.1f} MiB")


def launch_command(cfg_file: Path, recipe: str, nproc: int, candidate: Candidate,
                   out: Path, steps: int) -> list[str]:
    """The job that times `candidate`: the run's config, its layout's keys, `steps` steps."""
    sets = {**candidate.settings, "train.max_steps": steps, "train.monitor_interval_s": 0}
    args = [f"{key}={value}" for key, value in sets.items()]
    return [sys.executable, "-m", "leantrain", "launch", "--nproc", str(nproc), "--", "train",
            "--recipe", recipe, "--config", str(cfg_file), "--out", str(out), "--no-progress",
            *[part for arg in args for part in ("--set", arg)]]


def run_job(command: list[str], out: Path) -> float:
    """The job's global samples/s, from its summary; its error's last line when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise LeantrainError(one_line(lines[-1] if lines else f"exit code {done.returncode}"))
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["global_samples_per_second"])


def time_layouts(found: list[Candidate], cfg: TrainConfig, nproc: int, out: Path,
                 rounds: int, steps: int, budget_s: float,
                 run: Callable[[list[str], Path], float] = run_job) -> list[Candidate]:
    """Time every candidate that fits, in interleaved rounds within `budget_s`; then each
    one's speed-up over the reference, round by round."""
    jobs = out / "layouts"
    jobs.mkdir(parents=True, exist_ok=True)
    cfg_file = jobs / "config.yaml"
    atomic_write_text(cfg_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    timed = {c.name: c for c in found if c.failed is None}
    started = time.monotonic()

    def measure(name: str, round_: int) -> float | None:
        if time.monotonic() - started > budget_s:
            return None
        candidate, folder = timed[name], jobs / f"{name.replace('=', '')}-round{round_ + 1}"
        try:
            rate = run(launch_command(cfg_file, cfg.recipe, nproc, candidate, folder, steps),
                       folder)
        except (LeantrainError, OSError, ValueError, KeyError) as exc:
            why = str(exc) if isinstance(exc, LeantrainError) else one_line(exc)
            candidate.failed = f"its job failed: {why}"
            return None
        candidate.rates.append(rate)
        return rate

    interleave(list(timed), rounds, measure)
    reference = next((c for c in found if c.rates), None)
    for candidate in found:
        if reference is None or not candidate.rates:
            continue
        ratios = paired_ratios(candidate.rates, reference.rates)
        candidate.speedup = sorted(ratios)[len(ratios) // 2] if ratios else None
        candidate.interval = interval(ratios) if candidate is not reference else None
    return found


def winner(found: list[Candidate]) -> Candidate | None:
    """The fastest layout whose interval lies above 1, else the reference; None when fewer
    than two were timed (nothing was compared)."""
    if sum(1 for c in found if c.rates) < 2:
        return None
    reference = next((c for c in found if c.rates), None)
    faster = [c for c in found if c.interval is not None and c.interval[0] > 1.0]
    return max(faster, key=lambda c: c.speedup) if faster else reference


def bench_layouts(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
                  nproc: int, out: Path, rounds: int, steps: int,
                  budget_s: float) -> dict[str, Any]:
    """Price, then time, the layouts of a launch of `nproc` processes; written to
    layouts.json in `out`. The run's own plan.distributed and plan.parallel are replaced by
    each layout's (a tp=2 of the user's would leak into every job)."""
    cfg = replace(cfg, plan=replace(cfg.plan, distributed="auto", parallel=ParallelConfig()))
    _check_global_batch(bundle, cfg, nproc)
    found = candidates(build_model(), cfg, nproc)
    for candidate in found:
        price(candidate, build_model, bundle, cfg)
    time_layouts(found, cfg, nproc, out, rounds, steps, budget_s)
    best = winner(found)
    reference = next((c for c in found if c.rates), None)
    result = {"processes": nproc, "rounds": rounds, "steps": steps,
              "layouts": [c.to_dict() for c in found],
              "reference": None if reference is None else reference.name,
              "winner": None if best is None else best.name,
              "winner_settings": None if best is None else best.settings}
    atomic_write_text(out / LAYOUTS_JSON, json.dumps(result, indent=2))
    return result


def _check_global_batch(bundle: DataBundle, cfg: TrainConfig, nproc: int) -> None:
    """Every layout keeps the run's global batch, which the training set must fill once:
    a short set trained one partial batch under some layouts and was refused by others, and
    the one left was named the fastest of one."""
    size = None if is_stream(bundle.train) else len(bundle.train)
    needed = cfg.data.batch_size * cfg.plan.grad_accum * nproc
    if size is not None and size < needed:
        raise LeantrainError(
            f"--layouts {nproc}: each layout's global batch is data.batch_size x "
            f"plan.grad_accum x {nproc} processes = {needed} samples, more than the "
            f"training set's {size}: lower data.batch_size")


def format_layouts(result: dict[str, Any]) -> list[str]:
    lines = [f"layouts of {result['processes']} processes ({result['rounds']} interleaved "
             f"rounds of {result['steps']} steps each; speed-up over {result['reference']}, "
             "the median of per-round ratios [95% interval]):"]
    for row in result["layouts"]:
        peak = row["estimated_peak_bytes"]
        priced = f"{peak / 2**20:,.1f} MiB/rank est." if peak is not None else "not priced"
        if row["failed"] and not row["global_samples_per_second"]:
            lines.append(f"  {row['name']:<7} {priced:>20}  not timed: {row['failed']}")
            continue
        rates = row["global_samples_per_second"]
        rate = sorted(rates)[len(rates) // 2]
        low_high = row["speedup_interval"]
        spread = f" [{low_high[0]:.2f}-{low_high[1]:.2f}]" if low_high else \
            ("" if row["speedup"] == 1.0 else " (no interval: under 3 rounds)")
        lines.append(f"  {row['name']:<7} {priced:>20}  {rate:,.1f} samples/s  "
                     f"{row['speedup']:.2f}x{spread}")
    if result["winner"] is None:
        timed = [row["name"] for row in result["layouts"] if row["global_samples_per_second"]]
        lines.append(f"nothing to compare: {' and '.join(timed) or 'no layout'} ran; no "
                     "layout is named")
        return lines
    sets = " ".join(f"--set {k}={v}" for k, v in result["winner_settings"].items())
    kept = "" if result["winner"] != result["reference"] else \
        ": no other layout is faster beyond noise"
    lines.append(f"use {result['winner']}{kept} (leantrain launch --nproc "
                 f"{result['processes']} -- train ... {sets})")
    return lines
