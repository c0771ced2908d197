"""The default plan, decided by measurement where a rule can lose.

Precision, channels_last and the optimizer kernels each have a rule (`techniques.*.decide`),
and a rule is right for one model and wrong for the next: bf16 made the digits CNN 1.5x
faster on this project's CPU and a tiny BERT 0.9x as fast. What can change between two steps
(precision fp32/bf16, the optimizer kernels, channels_last) is decided on the run's own first
steps (`run.deciding`), and after it, where the run is long enough for a compile to pay,
torch.compile ("auto": eager unless measured to pay, `run.compile_choice`): the compiled and
the eager step, each a copy of the model kept training across paired windows, after the
compile. What cannot change mid-run (fp8, which converts layers; the fused loss) is measured
before a run long enough to pay: the rule's plan and each flip, a fresh copy of the model
trained for real (`Trainer.steps`, real batches) in interleaved rounds (`measure.rounds`),
within `BUDGET_SHARE` of the run (a first look at the rule's plan projects its length, with
`PROJECTION_MARGIN` for the projection's error). A flip is taken only when its paired
speed-up's 95% interval lies above 1.

The decisions are cached (`run.plan_cache`) under a key of the model's structure, the batch's
shapes and dtypes, the device, the torch and leantrain versions and the plan settings, so the
next run of the same model measures nothing (`plan.cache=false` measures again;
`LEANTRAIN_CACHE` moves it).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import TrainConfig, config_from_dict, merge
from ..data.batching import first_sample
from ..data.streams import is_stream
from ..distributed import DistContext
from ..errors import one_line
from ..measure import clock, deadline
from ..measure.rounds import MIN_ROUNDS, interleave, interval, paired_ratios
from ..measure.timing import WARMUP_STEPS, timed_window
from ..techniques import compile as compile_technique
from ..techniques import fused_cross_entropy, optimizer, precision
from ..techniques.base import Context
from ..techniques.memory_format import has_conv2d
from . import compile_choice, deciding, plan_cache
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
    if plan.optimizer_impl == "auto" and rule.optimizer_states == "fp32" \
            and not rule.optimizer_offload:  # (torchao's optimizers have their own kernels)
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


def split(flips: dict[str, Any], rule: ResolvedPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the run's first steps can decide, what only trials before the run can): fp8
    converts layers, so its labels (`FLIP_KEYS`) are measured on copies before the run."""
    in_run = {k: v for k, v in flips.items()
              if deciding.can_switch(plan_key(k), v, getattr(rule, plan_key(k)))}
    return in_run, {k: v for k, v in flips.items() if k not in in_run}


class Decided(NamedTuple):
    cfg: TrainConfig  # the choices measured before the run (or cached) explicit
    notes: dict[str, str]  # per plan key: how it was decided, for the summary
    record: dict[str, Any] | None  # what was measured before the run, or the cache's record
    pending: deciding.Pending | None = None  # what the run's first steps decide


def decide(cfg: TrainConfig, model: nn.Module, train: Dataset, val: Dataset, loss_fn=None,
           collate_fn=None) -> Decided:
    """Decide what can be decided before the run (the plan cache; fp8, the fused loss and
    compile on runs long enough to pay for trials), and leave what can change between two
    steps (precision fp32/bf16, optimizer kernels, channels_last) to the run's first steps
    (`run.deciding`). Leaves the model, its weights and the RNG as they were: every trial
    trains a copy, inside a forked RNG."""
    dist = DistContext.from_env()
    tokens = cfg.data.batch_size * cfg.data.context if cfg.data.context else None
    rule = resolve_plan(cfg.plan, model, tokens, cfg.optim.name, dist,
                        clip_norm=cfg.train.clip_norm)
    flips = alternatives(cfg, rule, model)
    compiling = compile_considered(cfg, rule, model)
    undecided = {**flips, **({"compile": True} if compiling else {})}
    if not undecided:
        return Decided(cfg, {}, None)
    if dist.active:
        return Decided(cfg, _rule_notes(undecided, "not measured under launch: ranks could "
                                                   "choose apart"), None)
    total = _total_steps(cfg, train)
    key = plan_cache.cache_key(cfg, model, first_sample(train), rule.device, collate_fn)
    cached = plan_cache.read(key) if cfg.plan.cache else None
    # (a record from a run too short to decide the switchable choices does not cover them)
    if cached is not None and {plan_key(k) for k in flips} <= set(cached["notes"]):
        return _from_cache(cfg, key, cached, compiling, total)
    in_run, before = split(flips, rule)
    notes, values, record = {}, {}, None
    if before:
        notes, values, record = _before_the_run(cfg, model, train, val, loss_fn, collate_fn,
                                                before, rule, total)
    least = math.ceil(deciding.least_steps(len(in_run)) / deciding.SHARE)
    if in_run and cfg.plan.compile is True:
        notes.update(_rule_notes(in_run, "not measured: the run compiles, and a switch would "
                                         "recompile it"))
        in_run = {}
    elif in_run and total < least:
        notes.update(_rule_notes(in_run, f"not measured: {total} steps is too short a run to "
                                         f"decide on its first steps, which needs {least}"))
        in_run = {}
    cfg = _explicit(cfg, values)
    if compiling and total < MIN_STEPS:
        notes.update(_rule_notes({"compile": True}, f"not measured: {total} steps is too "
                                                    f"short a run to pay for a compile"))
    probe = compile_probe(cfg, model, train, val, loss_fn, collate_fn, rule.device, total) \
        if compiling and total >= MIN_STEPS else None
    if not in_run and probe is None:
        if record is not None and not record.get("skipped") and cfg.plan.cache:
            plan_cache.write(key, record)
        return Decided(cfg, notes, record)
    pending = deciding.Pending(in_run, {k: getattr(rule, k) for k in in_run}, total,
                               key if cfg.plan.cache else None, prior=record or {},
                               compile=probe)
    return Decided(cfg, notes, record, pending)


def compile_probe(cfg: TrainConfig, model: nn.Module, train: Dataset, val: Dataset, loss_fn,
                  collate_fn, device: torch.device, total_steps: int):
    """For the run's first steps (`deciding.Pending.compile`): given the run's projected
    seconds and the plan they decided, probe compile on copies of the model where a compile
    of the usual cost could pay on a run this long (`compile_choice.worth_probing`), within
    `BUDGET_SHARE` of the run; returns (values to set, the note, the probe's record)."""
    def probe(run_s: float, decided: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
        probing, why_not = compile_choice.worth_probing(device.type, run_s)
        if not probing:
            return {}, f"eager ({why_not})", None
        trials = _Trials(cfg, model, train, val, loss_fn, collate_fn, {})
        with _forked_rng(device), deadline.until(clock.now() + BUDGET_SHARE * run_s):
            note, found = _decide_compile(trials, decided, BUDGET_SHARE * run_s, total_steps,
                                          run_s, device)
        if found is None or not found["chosen"]:
            return {}, note, found
        return {"compile": True, **_compile_mode(found, True)}, note, found
    return probe


def _forked_rng(device: torch.device):
    """Trials draw on copies of the model inside this: the run's random streams untouched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _from_cache(cfg: TrainConfig, key: str, cached: dict[str, Any], compiling: bool,
                total: int) -> Decided:
    log.info("plan: the measured choices come from the plan cache (%s)",
             plan_cache.cache_file(key))
    notes = {k: f"{v} (from the plan cache)" for k, v in cached["notes"].items()}
    values = dict(cached["values"])
    if compiling:  # the cached measurement, judged against this run's length
        values["compile"], notes["compile"] = _cached_compile(cached, total)
        values.update(_compile_mode(cached.get("results", {}).get("compile"),
                                    values["compile"]))
    return Decided(_explicit(cfg, values), notes, {**cached, "from_cache": True})


def _before_the_run(cfg, model, train, val, loss_fn, collate_fn, flips, rule, total
                    ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any] | None]:
    """(notes, values, record) of the trials on copies of the model for the choices that
    cannot change mid-run (fp8, the fused loss), on runs long enough to pay for them."""
    if total < MIN_STEPS:
        return _rule_notes(flips, f"not measured: {total} steps is too short a run to pay for "
                                  f"measuring, which needs {MIN_STEPS}"), {}, None
    with _forked_rng(rule.device):
        record = _measure(cfg, model, train, val, loss_fn, collate_fn, flips, rule, total)
    if record.get("skipped"):
        return _rule_notes(flips, record["skipped"]), {}, record
    return dict(record["notes"]), dict(record["values"]), record


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
             total_steps: int) -> dict[str, Any]:
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
    names = ["rule", *flips]
    overhead = max(look_s - trials.window_s, 0.0)
    per_round = len(names) * (overhead + trials.window_s)
    rounds = min(ROUNDS, int(budget // per_round)) if per_round > 0 else 0
    if rounds < MIN_ROUNDS:
        return {"skipped": f"not measured: the run is projected at {run_s:.0f} s; "
                           f"{MIN_ROUNDS} rounds of {len(names)} candidates need "
                           f"~{MIN_ROUNDS * per_round + look_s:.0f} s, over "
                           f"{BUDGET_SHARE:.0%} of it",
                "projected_run_s": run_s, "look_s": look_s, "cold_start_s": cold_s}
    # planned within the margin; held to the whole share whatever the load (measure.deadline)
    with deadline.until(began + BUDGET_SHARE * run_s):
        spare = budget / rounds / len(names) - overhead  # longer windows where it allows
        trials.window_s = min(WINDOW_S[1], max(WINDOW_S[0], spare))
        values, notes, results, measured = _measure_flips(trials, flips, rule, rounds)
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
