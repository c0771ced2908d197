"""One timed trial: train a fresh copy of the model for a few seconds under one plan.

A trial runs the trainer's real step (`Trainer.steps`) over a `Run` decided by `run.plan`, data
loading included, so what it times is what `train` will run. Throughput is the median over
windows of steps; on a GPU the device is synchronised only at window edges, so the host can run
ahead as it does in training.
The first step is timed apart (it carries compilation and lazy set-up). The losses of the first
steps are kept for the numerical check against the baseline.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, config_from_dict, merge
from ..data import DataBundle
from ..errors import LeantrainError, one_line
from ..measure import clock, deadline
from ..measure.memory import peak_bytes, reset_peak
from ..measure.rounds import interleave as interleave_rounds
from ..measure.rounds import paired_ratios
from ..measure.timing import timed_window
from ..run.plan import build, decide
from ..run.trainer import Trainer
from ..techniques.variant import Variant

WARMUP_STEPS = 2  # after the first step: caches, allocator and autotuners settle
MIN_WINDOWS = 3


@dataclass
class TrialResult:
    name: str
    variants: list[str]
    overrides: dict[str, Any]
    lossless: bool
    status: str  # ok | unsupported | failed | skipped
    reason: str = ""
    samples_per_second: float | None = None
    window_rates: list[float] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)  # median samples/s of each round
    steps: int = 0
    first_step_seconds: float | None = None
    compile_seconds: float | None = None
    compile: dict[str, Any] | None = None  # graphs, recompiles and why, graph breaks, break-even
    samples_per_step: int | None = None  # per optimizer step (batch size x accumulation)
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole trial
    # filled in by the search: comparison with the baseline and the projection
    speedup: float | None = None
    projected_seconds: float | None = None
    divergence: float | None = None
    check: str = "n/a"  # reference | ok | flagged | n/a
    plannable: bool = True  # False when a variant changes the model (not a config value)
    comparable: bool = True  # False when the batches differ (batch size): no step-wise check
    # statistics of the paired speed-up (filled in by the search)
    speedup_interval: list[float] | None = None  # 95% bootstrap interval, vs the baseline
    ratio_interval: list[float] | None = None  # 95% interval of the ratio to its reference
    spread: float | None = None  # coefficient of variation of its round (or window) rates
    noisy: bool = False  # its spread stayed past NOISY_CV after one re-measurement

    @property
    def measured(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrialSettings:
    seconds: float  # timed part of a trial, after the first and warm-up steps
    check_steps: int = 10  # losses kept for the numerical check


def plan_overrides(base: dict[str, Any], variants: list[Variant]) -> dict[str, Any]:
    """The config fragment of a trial: the baseline plan with each variant's values on top."""
    values = base
    for variant in variants:
        values = merge(values, variant.overrides)
    return values


def _timed_steps(steps, device: torch.device, settings: TrialSettings, result: TrialResult,
                 loss_tensors: list[torch.Tensor], limit: float) -> None:
    """Run the first step, the warm-up, then windows of steps until the time is used, at most
    `limit` steps."""

    def step() -> int:
        samples, loss = next(steps)
        result.steps += 1
        if len(loss_tensors) < settings.check_steps:
            loss_tensors.append(loss.detach().float())
        return samples

    _, result.first_step_seconds = timed_window(step, device, lambda k, t: k >= 1)
    timed_window(step, device, lambda k, t: result.steps >= min(1 + WARMUP_STEPS, limit))
    window_s = settings.seconds / (MIN_WINDOWS + 2)
    timed_start = clock.now()
    while result.steps < limit:
        samples, seconds = timed_window(step, device,
                                        lambda k, t: t >= window_s or result.steps >= limit)
        result.window_rates.append(samples / seconds)
        used = clock.now() - timed_start
        enough = len(result.window_rates) >= MIN_WINDOWS and result.steps >= settings.check_steps
        if (enough and used >= settings.seconds) or used >= 2 * settings.seconds:
            break
    while len(loss_tensors) < settings.check_steps and result.steps < limit:
        deadline.check()
        step()  # a very slow model: finish the steps the numerical check compares


def _trainer(variants: list[Variant], overrides: dict[str, Any],
             build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig
             ) -> Trainer:
    """The trial's trainer; raises LeantrainError when the plan cannot run here."""
    trial_cfg = config_from_dict(merge(cfg.to_dict(), overrides))
    model = build_model()
    for variant in variants:
        if variant.wrap_model is not None:
            model = variant.wrap_model(model)
    return Trainer(build(trial_cfg, model, bundle.train, bundle.val, measure_loader=False,
                         collate_fn=bundle.collate_fn, evaluates=False), progress_bar=False)


def plan_refusal(variants: list[Variant], base: dict[str, Any], model: nn.Module,
                 bundle: DataBundle, cfg: TrainConfig) -> str | None:
    """Why the plan cannot run here, found from its decisions alone (`run.plan.decide`): no
    data loaded, no step run. `model`: built by the caller, shared by plans that do not wrap
    it (deciding only reads it). None: no refusal found this way (the trial may still be)."""
    trial_cfg = config_from_dict(merge(cfg.to_dict(), plan_overrides(base, variants)))
    try:
        decide(trial_cfg, model, bundle.train, bundle.collate_fn)
    except LeantrainError as exc:
        return str(exc)
    return None


def unsupported_reason(variants: list[Variant], base: dict[str, Any],
                       build_model: Callable[[], nn.Module], bundle: DataBundle,
                       cfg: TrainConfig) -> str | None:
    """Why the plan cannot run here, found without training (None: it can)."""
    try:
        _trainer(variants, plan_overrides(base, variants), build_model, bundle, cfg)
    except LeantrainError as exc:
        return str(exc)
    return None


def run_trial(name: str, variants: list[Variant], base: dict[str, Any],
              build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
              settings: TrialSettings) -> TrialResult:
    """Measure one plan: the baseline `base` with `variants` switched on."""
    overrides = plan_overrides(base, variants)
    result = TrialResult(name, [v.name for v in variants], overrides,
                         lossless=all(v.lossless for v in variants), status="ok",
                         plannable=all(v.wrap_model is None for v in variants))
    start = clock.now()
    try:
        trainer = _trainer(variants, overrides, build_model, bundle, cfg)
    except LeantrainError as exc:
        result.status, result.reason = "unsupported", str(exc)
        return result
    run = trainer.run
    device = run.plan.device
    if run.plan.compile:  # compile afresh, as the run will: an earlier trial's compiled code
        torch._dynamo.reset()  # (another mode, other guards) would count as its recompile
    reset_peak(device)
    steps, loss_tensors = trainer.steps(), []
    # a compiled trial stays within one epoch: nothing it times may be a recompilation
    limit = run.steps_per_epoch if run.plan.compile else float("inf")
    try:
        _timed_steps(steps, device, settings, result, loss_tensors, limit)
        result.losses = [float(t) for t in loss_tensors]
    except Exception as exc:  # OOM, a kernel missing for a dtype, a compiler error: listed
        result.status = "failed"
        result.reason = one_line(exc)
        return result
    finally:
        steps.close()
        result.seconds = clock.now() - start
    result.samples_per_second = statistics.median(result.window_rates)
    result.samples_per_step = run.cfg.data.batch_size * run.plan.grad_accum
    if run.plan.compile:
        step_s = result.samples_per_step / result.samples_per_second
        result.compile_seconds = max(result.first_step_seconds - step_s, 0.0)
        result.compile = trainer.compiling.close().to_dict()
    result.peak_memory_bytes, result.peak_memory_kind = peak_bytes(device)
    return result


def skipped(name: str, variants: list[Variant], reason: str) -> TrialResult:
    return TrialResult(name, [v.name for v in variants], {}, all(v.lossless for v in variants),
                       "skipped", reason)


def merge_rounds(rounds: list[TrialResult]) -> TrialResult:
    """One result from a trial measured in several rounds (the first round is the cold one)."""
    first = rounds[0]
    bad = next((r for r in rounds if not r.measured), None)
    if bad is not None:
        return bad
    merged = TrialResult(**{**first.__dict__, "window_rates": [], "losses": list(first.losses)})
    merged.round_rates = [r.samples_per_second for r in rounds]
    merged.samples_per_second = statistics.median(merged.round_rates)
    merged.window_rates = [w for r in rounds for w in r.window_rates]
    merged.steps = sum(r.steps for r in rounds)
    merged.seconds = sum(r.seconds for r in rounds)
    merged.peak_memory_bytes = max(r.peak_memory_bytes for r in rounds)
    return merged


def round_ratios(measured: list[TrialResult], reference: list[TrialResult]) -> list[float]:
    """This trial's rate over the reference's rate in the same round, per round.

    A trial measured in one round only (compiling ones) is paired window by window with the
    reference's rate of that round: the interval then spans its windows, not rounds.
    """
    pairs = [(m, r) for m, r in zip(measured, reference, strict=False)
             if m.measured and r.measured]
    if len(pairs) == 1 and len(pairs[0][0].window_rates) > 1:
        m, r = pairs[0]
        return [w / r.samples_per_second for w in m.window_rates]
    return paired_ratios([m.samples_per_second for m, _ in pairs],
                         [r.samples_per_second for _, r in pairs])


def paired_speedup(measured: list[TrialResult], reference: list[TrialResult]) -> float | None:
    """Median over rounds of this trial's rate over the reference's rate in the same round."""
    ratios = round_ratios(measured, reference)
    return statistics.median(ratios) if ratios else None


def interleave(names: list[str], rounds: int, measure: Callable[[str, int], TrialResult | None]
               ) -> dict[str, list[TrialResult]]:
    """Trials in interleaved rounds (`measure.rounds`); a trial that did not run is dropped."""
    return interleave_rounds(names, rounds, measure, keep=lambda result: result.measured)
