"""The default plan, decided by measurement where a rule can lose.

Precision, channels_last and the optimizer kernels each have a rule (`techniques.*.decide`),
and a rule is right for one model and wrong for the next: bf16 made the digits CNN 1.5x
faster on this project's CPU and a tiny BERT 0.9x as fast. So before a run long enough to
pay, each "auto" choice is measured: the rule's plan and, for each choice, the plan with that
choice flipped, each a fresh copy of the model trained for real (`Trainer.steps`, real
batches) in interleaved rounds (`measure.rounds`). A flip is taken only when its paired
speed-up's 95% interval lies above 1. Measuring may cost `BUDGET_SHARE` of the run (a first
look at the rule's plan projects its length, with `PROJECTION_MARGIN` for the projection's
error); a shorter run keeps the rules and says so. Then torch.compile ("auto": eager unless
measured to pay, `run.compile_choice`) is probed on the chosen plan: the compiled and the eager
step, each a copy of the model kept training across paired windows, after the compile.

The decisions are cached under a key of the model's structure, the batch's shapes and dtypes,
the device, the torch and leantrain versions and the plan settings, so the next run of the
same model measures nothing (`plan.cache=false` measures again; `LEANTRAIN_CACHE` moves it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import __version__
from ..checkpoint import atomic_write_text
from ..config import TrainConfig, config_from_dict, merge
from ..data.batching import first_sample
from ..data.streams import is_stream
from ..distributed import DistContext
from ..env import cache_folder, cpu_model
from ..errors import LeantrainError, one_line
from ..measure import clock, deadline
from ..measure.rounds import MIN_ROUNDS, interleave, interval, paired_ratios
from ..measure.timing import WARMUP_STEPS, timed_window
from ..techniques import compile as compile_technique
from ..techniques import fused_cross_entropy, optimizer, precision
from ..techniques.base import Context
from ..techniques.memory_format import has_conv2d
from . import compile_choice
from .plan import ResolvedPlan, build, resolve_plan
from .trainer import Trainer

log = logging.getLogger(__name__)

BUDGET_SHARE = 0.03  # measuring may cost this share of the run
# the look projects the run's length from a short window; whole runs here came out up to 20%
# shorter than projected (benchmarks/results/default_plan.json: 112 s for a projected 134 s),
# so only this part of the share is planned, to stay within it of the real run
PROJECTION_MARGIN = 0.8
MIN_STEPS = 300  # a run of fewer optimizer steps cannot pay for a single round: no look
ROUNDS = 5
WINDOW_S = (0.2, 1.0)  # timed seconds per candidate and round
SPENT = f"the measuring budget ({BUDGET_SHARE:.0%} of the run) ran out"


@dataclass(frozen=True)
class Candidate:
    name: str  # "rule", or the technique flipped
    value: Any = None


def alternatives(cfg: TrainConfig, rule: ResolvedPlan, model: nn.Module) -> dict[str, Any]:
    """For each "auto" choice that could lose, the value(s) to try against the rule's, by a
    label: the plan key, or for a second value of one key a name `plan_key` maps (fp8)."""
    plan, ctx = cfg.plan, Context(rule.device, model, cfg.optim.name, rule.distributed)
    found: dict[str, Any] = {}
    if plan.precision == "auto":
        other = "fp32" if rule.precision != "fp32" else "bf16"
        if precision.check(ctx, other)[0]:
            found["precision"] = other
    if plan.channels_last == "auto" and has_conv2d(model) and rule.distributed != "fsdp":
        found["channels_last"] = not rule.channels_last
    if plan.optimizer_impl == "auto":
        other = "foreach" if rule.optimizer_impl == "fused" else "fused"
        if optimizer.check(ctx, other)[0]:
            found["optimizer_impl"] = other
    if plan.precision == "auto" and rule.precision == "bf16" and _wide_linears(model):
        for recipe in ("fp8", "fp8-rowwise"):  # on GPUs that have it: tensorwise and rowwise
            if precision.check(ctx, recipe)[0]:
                found[recipe] = recipe
    if plan.fused_cross_entropy == "auto" and fused_cross_entropy.check(ctx)[0]:
        found["fused_cross_entropy"] = True
    return found


# candidates measured against the rule whose label is not the plan key they set
FLIP_KEYS = {"fp8": "precision", "fp8-rowwise": "precision"}
# fp8 pays only on large matmuls: at width 1152 (text-gpt ~380 M on one H200) it ran 0.96x bf16
# (issue 31), so a model whose widest fp8 layer is narrower is not worth the trial's time
FP8_MIN_FEATURES = 2048


def plan_key(name: str) -> str:
    return FLIP_KEYS.get(name, name)


def _wide_linears(model: nn.Module) -> bool:
    modules = dict(model.named_modules())
    return any(max(modules[name].in_features, modules[name].out_features) >= FP8_MIN_FEATURES
               for name in precision.float8_layers(model))


def compile_considered(cfg: TrainConfig, rule: ResolvedPlan, model: nn.Module) -> bool:
    """Whether compile is "auto" and could run here, so a probe may decide it."""
    if cfg.plan.compile != "auto":
        return False
    ctx = Context(rule.device, model, cfg.optim.name, rule.distributed)
    return compile_technique.check(ctx)[0]


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


def _cache_file(key: str) -> Path:
    return cache_folder() / "plans" / f"{key}.json"


def _from_cache(key: str) -> dict[str, Any] | None:
    path = _cache_file(key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("values"), dict) \
        else None


def _to_cache(key: str, record: dict[str, Any]) -> None:
    """Keep a measurement for the next run; a cache that cannot be written (a read-only
    $HOME, common on clusters) costs the next run a measurement, not this one its result."""
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2))
    except (OSError, LeantrainError) as exc:
        log.warning("plan cache %s not written (%s): the next run measures again; set "
                    "LEANTRAIN_CACHE to a writable folder to keep it", path.parent,
                    getattr(exc, "strerror", None) or exc)


def _total_steps(cfg: TrainConfig, train: Dataset) -> int:
    if is_stream(train):  # (a stream's run is bounded by train.max_steps: `plan.build`)
        return cfg.train.max_steps or 0
    per_epoch = math.ceil(math.ceil(len(train) / cfg.data.batch_size) / cfg.plan.grad_accum)
    return min(per_epoch * cfg.train.epochs, cfg.train.max_steps or per_epoch * cfg.train.epochs)


class _Trials:
    """Fresh copies of the model trained for real under candidate plans, one window each."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, train: Dataset, val: Dataset,
                 loss_fn, collate_fn, flips: dict[str, Any]):
        self.cfg, self.model, self.train, self.val = cfg, model, train, val
        self.loss_fn, self.collate_fn, self.flips = loss_fn, collate_fn, flips
        self.window_s = WINDOW_S[0]

    def config(self, name: str) -> TrainConfig:
        if name == "rule":
            return self.cfg
        return config_from_dict(merge(self.cfg.to_dict(),
                                      {"plan": {plan_key(name): self.flips[name]}}))

    def rate(self, name: str) -> tuple[float, float]:
        """(samples/s over a window after warm-up, wall seconds of the whole trial)."""
        start = clock.now()
        run = build(self.config(name), copy.deepcopy(self.model), self.train, self.val,
                    self.loss_fn, measure_loader=False, collate_fn=self.collate_fn,
                    evaluates=False)
        steps = Trainer(run, progress_bar=False).steps()
        try:
            step: Callable[[], int] = lambda: next(steps)[0]  # noqa: E731
            device = run.plan.device
            timed_window(step, device, lambda k, t: k >= WARMUP_STEPS)
            samples, seconds = timed_window(step, device,
                                            lambda k, t: k >= 2 and t >= self.window_s)
        finally:
            steps.close()
        return samples / seconds, clock.now() - start


def _rule_notes(flips: dict[str, Any], why: str) -> dict[str, str]:
    return {plan_key(name): f"rule ({why})" for name in flips}


def decide(cfg: TrainConfig, model: nn.Module, train: Dataset, val: Dataset, loss_fn=None,
           collate_fn=None) -> tuple[TrainConfig, dict[str, str], dict[str, Any] | None]:
    """(the config with the measured choices explicit, a note per choice for the summary,
    the measurement's record or None). Leaves the model, its weights and the RNG as they
    were: every trial trains a copy, inside a forked RNG."""
    dist = DistContext.from_env()
    tokens = cfg.data.batch_size * cfg.data.context if cfg.data.context else None
    rule = resolve_plan(cfg.plan, model, tokens, cfg.optim.name, dist,
                        clip_norm=cfg.train.clip_norm)
    flips = alternatives(cfg, rule, model)
    compiling = compile_considered(cfg, rule, model)
    undecided = {**flips, **({"compile": True} if compiling else {})}
    if not undecided:
        return cfg, {}, None
    if dist.active:
        return cfg, _rule_notes(undecided, "not measured under launch: ranks could choose "
                                           "apart"), None
    total = _total_steps(cfg, train)
    if total < MIN_STEPS:
        return cfg, _rule_notes(undecided, f"not measured: {total} steps is too short a run to "
                                           f"pay for measuring, which needs {MIN_STEPS}"), None
    key = cache_key(cfg, model, first_sample(train), rule.device, collate_fn)
    cached = _from_cache(key) if cfg.plan.cache else None
    if cached is not None:
        log.info("plan: the measured choices come from the plan cache (%s)", _cache_file(key))
        notes = {k: f"{v} (from the plan cache)" for k, v in cached["notes"].items()}
        values = dict(cached["values"])
        if compiling:  # the cached measurement, judged against this run's length
            values["compile"], notes["compile"] = _cached_compile(cached, total)
            values.update(_compile_mode(cached.get("results", {}).get("compile"),
                                        values["compile"]))
        return _explicit(cfg, values), notes, {**cached, "from_cache": True}
    devices = [rule.device] if rule.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        record = _measure(cfg, model, train, val, loss_fn, collate_fn, flips, rule, total,
                          compiling)
    if record.get("skipped"):
        return cfg, _rule_notes(undecided, record["skipped"]), record
    if cfg.plan.cache:
        _to_cache(key, record)
    values = dict(record["values"])
    if "compile" in record.get("results", {}):  # this run probed it: the compile is paid
        found = record["results"]["compile"]
        values["compile"] = found["chosen"]
        values.update(_compile_mode(found, found["chosen"]))
    return _explicit(cfg, values), record["notes"], record


def _compile_mode(found: dict[str, Any] | None, compiling: bool) -> dict[str, str]:
    """The measured compile mode, when compiling in one other than the default."""
    mode = (found or {}).get("mode", "default")
    return {"compile_mode": mode} if compiling and mode != "default" else {}


def _cached_compile(cached: dict[str, Any], total: int) -> tuple[bool, str]:
    found = cached.get("results", {}).get("compile")
    if not found:
        why = cached["notes"].get("compile", "eager (not measured)")
        return False, f"{why} (from the plan cache; plan.cache=false measures again)"
    take, note = compile_choice.verdict(found, total, sunk=False)
    return take, f"{note} (from the plan cache)"


def _explicit(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    return config_from_dict(merge(cfg.to_dict(), {"plan": values}))


def _measure(cfg, model, train, val, loss_fn, collate_fn, flips, rule: ResolvedPlan,
             total_steps: int, compiling: bool) -> dict[str, Any]:
    trials = _Trials(cfg, model, train, val, loss_fn, collate_fn, flips)
    # the first trial carries the process's one-off kernel set-up (oneDNN primitives: 1.4 s
    # for the digits CNN in bf16, `cold_start_s` in benchmarks/results/default_plan.json),
    # which the run would pay at its first step anyway; the second is the look: the rule's
    # speed and what a trial costs
    cold_s = trials.rate("rule")[1]
    began = clock.now()
    rate, look_s = trials.rate("rule")
    samples = total_steps * cfg.data.batch_size * cfg.plan.grad_accum
    run_s = samples / rate
    budget = BUDGET_SHARE * PROJECTION_MARGIN * run_s - look_s
    probing, why_not = compile_choice.worth_probing(rule.device.type, run_s) if compiling \
        else (False, "")
    # the compile probe's least windows (eager and compiled, MIN_ROUNDS each) are kept out of
    # the flips' share; its compile is what the prior found worth risking on a run this long
    reserve = 2 * MIN_ROUNDS * WINDOW_S[0] if probing else 0.0
    names = ["rule", *flips]
    overhead = max(look_s - trials.window_s, 0.0)
    per_round = len(names) * (overhead + trials.window_s)
    rounds = min(ROUNDS, int((budget - reserve) // per_round)) if per_round > 0 else 0
    if flips and rounds < MIN_ROUNDS:
        return {"skipped": f"not measured: the run is projected at {run_s:.0f} s; "
                           f"{MIN_ROUNDS} rounds of {len(names)} candidates need "
                           f"~{MIN_ROUNDS * per_round + look_s + reserve:.0f} s, over "
                           f"{BUDGET_SHARE:.0%} of it",
                "projected_run_s": run_s, "look_s": look_s, "cold_start_s": cold_s}
    values, notes, results, measured = {}, {}, {}, {}
    # planned within the margin; held to the whole share whatever the load (measure.deadline)
    with deadline.until(began + BUDGET_SHARE * run_s):
        if flips:  # longer windows where the budget allows
            spare = (budget - reserve) / rounds / len(names) - overhead
            trials.window_s = min(WINDOW_S[1], max(WINDOW_S[0], spare))
            values, notes, results, measured = _measure_flips(trials, flips, rule, rounds)
        if compiling and not probing:
            notes["compile"] = f"eager ({why_not})"
        elif compiling:
            left = budget - (clock.now() - began - look_s)
            notes["compile"], found = _decide_compile(trials, values, left, total_steps,
                                                      run_s, rule.device)
            if found is not None:
                results["compile"] = found
    seconds = clock.now() - began
    log.info("plan: measured in %.1f s (%.1f%% of the projected %.0f s run), after %.1f s of "
             "one-off kernel set-up", seconds, 100 * seconds / run_s, run_s, cold_s)
    return {"values": values, "notes": notes, "results": results, "rates": measured,
            "rounds": rounds, "window_s": trials.window_s, "seconds": seconds,
            "cold_start_s": cold_s, "projected_run_s": run_s,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def _decide_compile(trials: _Trials, values: dict[str, Any], left_s: float,
                    total_steps: int, run_s: float, device: torch.device
                    ) -> tuple[str, dict[str, Any] | None]:
    """The compile note and its probe's record (the choice under "chosen"), or None when the
    probe failed; `left_s`: what remains of the measuring budget for its windows."""
    if deadline.left() <= 0:
        return f"eager ({SPENT} before the compile probe)", None
    rounds = max(MIN_ROUNDS, min(ROUNDS, int(left_s // (2 * WINDOW_S[0]))))
    trials.window_s = min(WINDOW_S[1], max(WINDOW_S[0], left_s / rounds / 2))
    log.info("plan: probing torch.compile against eager (%d rounds, %.1f s windows, after the "
             "compile)", rounds, trials.window_s)
    modes = compile_choice.modes(_explicit(trials.cfg, values), trials.model, run_s, device)
    try:
        found = compile_choice.probe(trials, _explicit(trials.cfg, values), rounds, modes)
    except deadline.BudgetSpent:  # a compile slower than its prior on a loaded machine
        torch._dynamo.reset()
        log.warning("plan: the compile probe ran past the measuring budget; eager kept")
        return f"eager (the compile probe ran past {BUDGET_SHARE:.0%} of the run)", None
    except Exception as exc:  # a model Dynamo cannot trace, a compiler that fails
        why = one_line(exc)
        log.warning("plan: the compiled step could not be measured (%s)", why)
        return f"eager (compile failed when probed: {why})", None
    found["chosen"], note = compile_choice.verdict(found, total_steps, sunk=True)
    return note, found


def _measure_flips(trials: _Trials, flips: dict[str, Any], rule: ResolvedPlan, rounds: int):
    """(values, notes, results, rates) of the flipped choices against the rule's."""
    log.info("plan: measuring %s against the rule (%d rounds, %.1f s windows)",
             ", ".join(f"{k}={v}" for k, v in flips.items()), rounds, trials.window_s)
    failed: dict[str, str] = {}

    def measure(name: str, r: int) -> float | None:
        if deadline.left() <= 0:
            failed.setdefault(name, SPENT)
            return None
        try:
            return trials.rate(name)[0]
        except deadline.BudgetSpent:  # slower than the look measured: what ran counts
            failed[name] = SPENT
            return None
        except Exception as exc:  # e.g. out of memory: that candidate is not measured
            failed[name] = one_line(exc)
            log.warning("plan: %s could not be measured (%s)", name, failed[name])
            return None

    measured = interleave(["rule", *flips], rounds, measure)
    values, notes, results, best = {}, {}, {}, {}
    for name, flipped in flips.items():
        key = plan_key(name)
        ruled = values.setdefault(key, getattr(rule, key))
        ratios = paired_ratios(measured[name], measured["rule"])
        if len(ratios) < MIN_ROUNDS:
            note = f"rule ({_show(key, flipped)} not measured: " \
                   f"{failed.get(name) or failed.get('rule', 'too few rounds')})"
        else:
            found = interval(ratios)
            median = statistics.median(ratios)
            wins = found is not None and found[0] > 1.0
            span = f"{len(ratios)} rounds, 95% interval {found[0]:.2f}-{found[1]:.2f}x" \
                if found else f"{len(ratios)} rounds"
            note = (f"measured: {_show(key, flipped)} ran {median:.2f}x as fast as "
                    f"{_show(key, ruled)} ({span})" + ("" if wins else
                                                       f"; {_show(key, ruled)} kept"))
            results[name] = {"key": key, "rule": ruled, "tried": flipped, "ratios": ratios,
                             "median": median, "interval": list(found) if found else None}
            if wins and median > best.get(key, (None, 0.0))[1]:  # the fastest winner per key
                best[key] = (flipped, median)
        notes[key] = f"{notes[key]}; {note}" if key in notes else note
    for key, (flipped, _) in best.items():
        values[key] = flipped
    for result in results.values():
        result["chosen"] = values[result["key"]]
    return values, notes, results, measured


def _show(name: str, value: Any) -> str:
    """"channels_last off", "bf16", "foreach": a value as the summary line names it."""
    return f"{name} {'on' if value else 'off'}" if isinstance(value, bool) else str(value)
