"""The bench: baseline, every technique alone, then a greedy search over combinations.

Speed-ups do not multiply (Amdahl), so every combination that could be recommended is itself
measured. Trials are ranked by the projected time of the configured run (samples to train at
the measured rate, plus compilation), which is what the user pays for: a compiler that speeds up
steps by 20% but takes 40 s to compile loses on a 10-second run and wins on a 10-hour one.

Numerical check: every trial trains the same batches from the same initial weights as the
baseline, so its first losses can be compared step by step. Lossless techniques must agree
within float-reordering noise; lossy ones within a tolerance the user sets. A trial past its
tolerance is flagged and cannot win.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, merge
from ..data import DataBundle
from ..data.streams import is_stream
from ..errors import LeantrainError
from ..measure import clock, deadline, load
from ..measure.compile_watch import break_even_steps
from ..measure.load import LoadWatch
from ..measure.rounds import MIN_ROUNDS, interval, paired_ratios, spread
from ..run.plan import device_setting, stream_samples
from ..techniques import REGISTRY
from ..techniques.variant import Variant
from .batch_size import BatchSizeResult, find_batch_size
from .tolerances import LOSSLESS_TOL, LOSSY_TOL
from .trials import (
    TrialResult,
    TrialSettings,
    interleave,
    merge_rounds,
    plan_refusal,
    round_ratios,
    run_trial,
    skipped,
)

log = logging.getLogger(__name__)

COMPILE_PRIOR_S = 40.0  # compile cost assumed before one is measured (small models: 20-60 s)
MIN_GAIN = 0.02  # a combination must beat the current best by this much to be kept (noise)
# A lossless technique within this much of the baseline alone is still tried in combinations:
# the overhead it removes (per-sample collation, per-tensor optimizer kernels) hides behind slow
# compute and shows once other techniques make the compute fast (Amdahl, the other way round).
NEUTRAL = 0.03
ROUNDS = 5  # each trial is measured in this many interleaved rounds
# A trial whose round rates vary by more than this (coefficient of variation) is measured
# again once; still past it, it is "noisy" and cannot win. On this project's 2-core CPU the
# rounds of a steady trial vary by 3-10%; the issue that asked for this saw 58-1,164
# samples/s inside one trial.
NOISY_CV = 0.20
FINAL_CHECK_ROUNDS = MIN_ROUNDS  # rounds of the winner against the default plan, at least
# kept back for writing bench.json, the chart and the plans after the last trial, and for the
# process's exit, on a quiet machine; as many times more as the machine is slower now
# (`measure.load.slowdown`): beside 4 spinning processes on 2 cores, that tail took 5.9 s
WRITE_RESERVE_S = 2.0
# The bench moves the batch by one doubling at most: the LR scaling rule is an approximation
# that holds near the batch the user tuned, and a bigger batch means fewer optimizer steps in
# the same epochs, which can leave a fixed-epoch run short of its accuracy.
# `leantrain find-batch-size` explores the whole range and reports it.
BATCH_GROWTH = 2


@dataclass
class BenchResult:
    device: str
    budget_s: float
    elapsed_s: float
    run_samples: int  # samples in the configured run: the basis of the projected times
    loss_tol: float
    lossless_tol: float
    trials: list[TrialResult]
    winner: str
    not_benchmarked: dict[str, str] = field(default_factory=dict)
    batch_size: dict[str, Any] | None = None  # the batch-size finder's sizes, when it ran
    # the winner paired with the plan `leantrain train` would use; keep_default when it does
    # not beat it beyond noise (the written plan then keeps the default)
    versus_default: dict[str, Any] | None = None
    # what other processes used of the cores while the bench timed (measure.load)
    load: dict[str, Any] | None = None

    @property
    def keep_default(self) -> bool:
        return bool(self.versus_default and self.versus_default["keep_default"])

    @property
    def baseline(self) -> TrialResult:
        return self.trials[0]

    def trial(self, name: str) -> TrialResult:
        return next(t for t in self.trials if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["trials"] = [t.to_dict() for t in self.trials]
        return out


def baseline_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """A plain fp32 eager loop with a per-sample DataLoader: what a hand-written loop does."""
    device = device_setting(cfg.plan.device)
    return {
        "plan": {"device": device, "precision": "fp32", "channels_last": False,
                 "compile": False, "cudnn_benchmark": False, "tf32": False,
                 "optimizer_impl": "for-loop"},
        "data": {"loader": "dataloader", "num_workers": 0},
    }


def technique_variants() -> tuple[list[Variant], dict[str, str]]:
    """Every variant in the registry (compiling ones last: they are the expensive trials)."""
    variants, notes = [], {}
    for module in REGISTRY.values():
        if module.VARIANTS:
            variants.extend(module.VARIANTS)
        else:
            notes[module.NAME] = module.BENCH_NOTE
    variants.sort(key=lambda v: _compiles([v]))
    return variants, notes


def _compiles(variants: list[Variant]) -> bool:
    return any(v.overrides.get("plan", {}).get("compile") is True for v in variants)


BASELINE_LABEL = "baseline"  # the trial of no technique: the reference of every speed-up


def _label(variants: list[Variant]) -> str:
    return " + ".join(v.name for v in variants) or BASELINE_LABEL


def _break_even(trial: TrialResult, base: TrialResult) -> int | None:
    """Optimizer steps after which the compiled trial's plan has paid for its compile against
    the baseline (None: never, its steps are not faster)."""
    if trial is base or not trial.speedup or not trial.samples_per_step:
        return None
    base_step = trial.samples_per_step / base.samples_per_second  # the same samples, baseline
    return break_even_steps(trial.compile_seconds or 0.0, base_step, base_step / trial.speedup)


def write_reserve() -> float:
    """Seconds kept back for writing the results and exiting, on the machine as loaded now."""
    return WRITE_RESERVE_S * load.slowdown()


class _Bench:
    """The state of one bench run: clock, budget, and trials so far."""

    def __init__(self, build_model: Callable[[], nn.Module], bundle: DataBundle,
                 cfg: TrainConfig, budget_s: float, loss_tol: float, started: float):
        self.build_model, self.bundle, self.cfg = build_model, bundle, cfg
        self.budget_s, self.loss_tol = budget_s, loss_tol
        self.base = baseline_overrides(cfg)
        self.start = started
        self.cut: dict[str, float] = {}  # trials the deadline interrupted: seconds they had run
        self.refused: dict[str, str] = {}  # plans that cannot run here, and why
        self.trials: list[TrialResult] = []
        self.round_seconds: list[float] = []  # wall time of each measured (non-compile) round
        self.compile_seconds: list[float] = []
        self.run_samples = stream_samples(cfg) if is_stream(bundle.train) \
            else len(bundle.train) * cfg.train.epochs
        self.round_s = min(max(budget_s / 120, 0.3), 1.5)  # timed part of one round of a trial

    def elapsed(self) -> float:
        return clock.now() - self.start

    def left(self, for_final_check: bool = False) -> float:
        """Seconds left; the trials leave enough for the final check against the default
        plan (its first rounds: two trials each, at the median measured round, and a compile
        once a compiling plan has been measured: it may win, and the check compiles it)."""
        reserve = 0.0
        if not for_final_check:
            reserve = FINAL_CHECK_ROUNDS * 2 * statistics.median(self.round_seconds or [0.0]) \
                + max(self.compile_seconds, default=0.0)
        return self.budget_s - write_reserve() - self.elapsed() - reserve

    def bounded(self, work: Callable[[], Any], for_final_check: bool = False, what: str = ""
                ) -> Any:
        """`work()`, interrupted where the time left ends (`measure.deadline`): None then.
        A compile or a round that the load made slower than measured stops at the deadline
        instead of running past the budget."""
        started = clock.now()
        try:
            with deadline.until(started + self.left(for_final_check)):
                return work()
        except deadline.BudgetSpent:
            self.cut[what] = clock.now() - started
            log.info("%s: cut at the budget's deadline after %.0f s", what or "measuring",
                     self.cut[what])
            torch._dynamo.reset()  # a compile cut midway leaves nothing behind for the next
            return None

    def _estimate(self, variants: list[Variant]) -> float:
        estimate = max(self.round_seconds[-5:], default=1.5 * self.round_s + 1.0)
        if _compiles(variants):
            estimate += max(self.compile_seconds, default=COMPILE_PRIOR_S)
        return estimate

    def _round(self, variants: list[Variant], required: bool) -> TrialResult | None:
        """One round of one trial, or None when the budget cannot pay for it."""
        if not required and self._estimate(variants) > self.left():
            return None
        settings, label = TrialSettings(seconds=self.round_s), _label(variants)
        # the baseline's first round may use the final check's share: nothing runs without it
        result = self.bounded(lambda: run_trial(label, variants, self.base, self.build_model,
                                                self.bundle, self.cfg, settings),
                              for_final_check=required, what=label)
        if result is None:
            return None
        if result.compile_seconds is not None:
            self.compile_seconds.append(result.compile_seconds)
        elif result.measured:
            self.round_seconds.append(result.seconds)
        return result

    def find_refusals(self, groups: list[list[Variant]]) -> None:
        """Plans that cannot run here, found from their decisions on one shared model before
        anything is timed: they cost no round, and a trial the budget later cannot pay for
        still says when it could not have run anyway."""
        def find() -> None:
            model = self.build_model()
            for variants in groups:
                if variants and all(v.wrap_model is None for v in variants):
                    reason = plan_refusal(variants, self.base, model, self.bundle, self.cfg)
                    if reason is not None:
                        self.refused[_label(variants)] = reason

        self.bounded(find, for_final_check=True, what="finding the plans that cannot run here")

    def _not_run(self, label: str, variants: list[Variant]) -> TrialResult:
        """A trial that did not run: refused here, cut at the deadline, or not paid for."""
        if label in self.refused:
            return TrialResult(label, [v.name for v in variants], {},
                               all(v.lossless for v in variants), "unsupported",
                               self.refused[label])
        if label in self.cut:
            return skipped(label, variants, f"budget: cut at the deadline after "
                           f"{self.cut[label]:.0f} s (the machine ran slower than measured)")
        return skipped(label, variants, f"budget: {max(self.left(), 0.0):.0f} s left, one "
                       f"round needs ~{self._estimate(variants):.0f} s")

    def measure(self, groups: list[list[Variant]], reference: TrialResult | None = None
                ) -> list[TrialResult]:
        """Measure plans in interleaved rounds; speed-ups are ratios within each round.

        The first group is the reference of the others (re-measured every round); its own
        speed-up is taken from `reference` (None: it is the baseline, 1.0 by definition).
        A compiling plan gets one round only: each round would compile again.
        """
        by_label = {_label(g): g for g in groups}

        def one_round(label: str, r: int) -> TrialResult | None:
            variants = by_label[label]
            if label in self.refused or r > 0 and _compiles(variants):
                return None
            return self._round(variants, required=reference is None and not variants and r == 0)

        rounds = interleave(list(by_label), ROUNDS, one_round)
        ref_label = _label(groups[0])
        references = dict.fromkeys(rounds, rounds[ref_label])
        noisy = [label for label, measured in rounds.items() if label != ref_label
                 and (spread([m.samples_per_second for m in measured]) or 0) > NOISY_CV]
        if noisy:  # measured again once, beside the reference: the second take counts
            log.info("measuring again (spread over %.0f%%): %s", 100 * NOISY_CV,
                     ", ".join(noisy))
            again = interleave([ref_label, *noisy], ROUNDS, one_round)
            for label in noisy:  # the second take counts only when it is as long as the first:
                # a winner once came from one re-measured round (the budget ran out) after five
                if len(again[label]) >= len(rounds[label]):  # noisy ones
                    rounds[label], references[label] = again[label], again[ref_label]
        results = []
        for label, measured in rounds.items():
            if label == ref_label and reference is not None:
                continue  # a re-measurement of a trial already recorded
            result = self._not_run(label, by_label[label]) if not measured else \
                self._with_statistics(merge_rounds(measured), measured, references[label],
                                      reference)
            self.record(result)
            results.append(result)
        return results

    @staticmethod
    def _with_statistics(result: TrialResult, measured: list[TrialResult],
                         ref_rounds: list[TrialResult], reference: TrialResult | None
                         ) -> TrialResult:
        """Speed-up (median paired ratio), its 95% interval, and the spread of the rates."""
        if not result.measured:
            return result
        ratios = round_ratios(measured, ref_rounds)
        base = reference.speedup if reference is not None else 1.0
        rates = [m.samples_per_second for m in measured]
        result.spread = spread(rates if len(rates) > 1 else result.window_rates)
        result.noisy = (result.spread or 0) > NOISY_CV
        if ratios:
            result.speedup = base * statistics.median(ratios)
            found = interval(ratios)
            if found is not None:
                result.ratio_interval = list(found)
                result.speedup_interval = [base * found[0], base * found[1]]
        return result

    def record(self, result: TrialResult) -> None:
        self._compare(result)
        self.trials.append(result)
        self._report_progress(result)

    def _compare(self, trial: TrialResult) -> None:
        if not trial.measured:
            return
        base = self.trials[0] if self.trials else trial
        if trial is base:
            trial.speedup = 1.0
        # drift-corrected: the baseline's rate times the paired speed-up
        trial.projected_seconds = self.run_samples / (base.samples_per_second * trial.speedup) \
            + (trial.compile_seconds or 0.0)
        if trial.compile is not None:
            trial.compile["break_even_steps"] = _break_even(trial, base)
        if trial is base:
            trial.check, trial.divergence = "reference", 0.0
            return
        if not trial.comparable:
            trial.check = "not comparable"
            return
        n = min(len(trial.losses), len(base.losses))
        if n == 0:
            return
        trial.divergence = max(abs(a - b) / max(abs(b), 1e-6)
                               for a, b in zip(trial.losses[:n], base.losses[:n], strict=True))
        tol = LOSSLESS_TOL if trial.lossless else self.loss_tol
        trial.check = "ok" if trial.divergence <= tol else "flagged"

    def _report_progress(self, t: TrialResult) -> None:
        if t.measured:
            what = (f"{t.samples_per_second:,.0f} samples/s ({t.speedup:.2f}x over "
                    f"{len(t.round_rates)} rounds), loss check {t.check}")
        else:
            what = f"{t.status}: {t.reason}"
        log.info("%s: %s | %.0f s elapsed, at most %.0f s left", t.name, what, self.elapsed(),
                 max(self.left(), 0.0))


def _eligible(trial: TrialResult) -> bool:
    """Measured, numerically sound, steady and writable to a plan: it may be combined."""
    return trial.measured and trial.check in ("reference", "ok", "not comparable") \
        and trial.plannable and not trial.noisy


def significant(trial: TrialResult) -> bool:
    """A speed-up counts only when its 95% interval lies above 1."""
    return trial.speedup_interval is not None and trial.speedup_interval[0] > 1.0


def _can_win(trial: TrialResult) -> bool:
    return _eligible(trial) and (trial.check == "reference" or significant(trial))


def check_arguments(budget_s: float, loss_tol: float) -> None:
    """The bench's own numbers, checked before anything is loaded or measured."""
    if not 0 < budget_s < math.inf:  # NaN fails this too: a NaN budget never ran out
        raise LeantrainError(f"--budget-s must be > 0 and finite, got {budget_s}")
    if not 0 < loss_tol < math.inf:  # inf: any lossy candidate would pass, whatever it cost
        raise LeantrainError(f"--loss-tol must be > 0 and finite, got {loss_tol}")


def run_bench(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
              budget_s: float, loss_tol: float = LOSSY_TOL, tune_batch_size: bool = True,
              started: float | None = None) -> BenchResult:
    """Measure the baseline, each technique alone, then combinations; pick the winner.

    With `tune_batch_size`, the batch-size finder then runs under the winning plan; a faster
    size (with its learning rate scaled by the stated rule) becomes the winner.
    `build_model()` must return the same initial weights on every call (seed inside it).
    The budget counts from `started` (on `clock.now()`; default: now): the command's start,
    its loading included, and it keeps back the seconds that writing the results takes.
    """
    check_arguments(budget_s, loss_tol)
    with LoadWatch() as watch:
        result = _run(build_model, bundle, cfg, budget_s, loss_tol, tune_batch_size,
                      clock.now() if started is None else started)
    result.load = watch.reading.to_dict()
    if watch.reading.busy:
        log.warning(watch.reading.describe())
    return result


def _run(build_model, bundle: DataBundle, cfg: TrainConfig, budget_s: float, loss_tol: float,
         tune_batch_size: bool, started: float) -> BenchResult:
    bench = _Bench(build_model, bundle, cfg, budget_s, loss_tol, started)
    variants, notes = technique_variants()
    bench.find_refusals([[v] for v in variants])
    first = bench.measure([[]] + [[v] for v in variants])
    baseline = first[0]
    if not baseline.measured and BASELINE_LABEL in bench.cut:
        raise LeantrainError(f"--budget-s {budget_s:g} ended before the baseline's first round "
                             f"did ({bench.elapsed():.0f} s in, {write_reserve():.0f} s kept to "
                             "write the results): give a larger budget")
    if not baseline.measured:
        raise LeantrainError(f"the baseline trial could not run: {baseline.reason}")
    _greedy_combinations(bench, variants, {t.name: t for t in first[1:]})
    winner = min((t for t in bench.trials if _can_win(t)), key=lambda t: t.projected_seconds,
                 default=baseline)
    sizes = None
    if tune_batch_size:
        sizes, batch_trial = _tune_batch_size(bench, winner)
        if batch_trial is not None and _can_win(batch_trial):
            winner = batch_trial
    log.info("winner: %s", winner.name)
    versus = _versus_default(bench, winner)
    log.info("versus the default plan: %s", versus["verdict"])
    return BenchResult(bench.base["plan"]["device"], budget_s, bench.elapsed(), bench.run_samples,
                       loss_tol, LOSSLESS_TOL, bench.trials, winner.name, notes,
                       sizes.to_dict() if sizes else None, versus)


DEFAULT_LABEL = "default plan (leantrain train)"


def _versus_default(bench: _Bench, winner: TrialResult) -> dict[str, Any]:
    """Pair the winner with the plan `leantrain train` resolves by itself, in interleaved
    rounds, within the budget: a winner the budget left unchecked is not written as the plan
    (the default is kept, and the verdict says why)."""
    compiles = winner.overrides.get("plan", {}).get("compile") is True
    settings = TrialSettings(seconds=bench.round_s)

    def one_round(label: str, r: int) -> TrialResult | None:
        if r >= FINAL_CHECK_ROUNDS and (compiles or
                                        bench.left(for_final_check=True) < 2 * bench._estimate([])):
            return None
        overrides = {} if label == DEFAULT_LABEL else winner.overrides
        return bench.bounded(lambda: run_trial(label, [], overrides, bench.build_model,
                                               bench.bundle, bench.cfg, settings),
                             for_final_check=True, what=label)

    rounds = interleave([DEFAULT_LABEL, winner.name], ROUNDS, one_round)
    ratios = round_ratios(rounds[winner.name], rounds[DEFAULT_LABEL])
    found = interval(ratios)
    median = statistics.median(ratios) if ratios else None
    keep = found is None or found[0] <= 1.0
    text = "not measured" if median is None else (
        f"{median:.2f}x the default's samples/s (95% interval "
        + (f"{found[0]:.2f}-{found[1]:.2f}x" if found else "n/a") + f", {len(ratios)} pairs)")
    if found is None and bench.left(for_final_check=True) <= 0:
        text += f"; the budget ended before the {MIN_ROUNDS} pairs a verdict needs"
    return {
        "ratio": median, "interval": list(found) if found else None, "pairs": len(ratios),
        "default_rates": [t.samples_per_second for t in rounds[DEFAULT_LABEL] if t.measured],
        "winner_rates": [t.samples_per_second for t in rounds[winner.name] if t.measured],
        "keep_default": keep,
        "verdict": (f"keep the default: the winner ({winner.name}) ran at {text}, not faster "
                    "beyond noise") if keep else f"the winner ran at {text}",
    }


def _tune_batch_size(bench: _Bench, winner: TrialResult
                     ) -> tuple[BatchSizeResult | None, TrialResult | None]:
    """Run the finder under the winner's plan; a faster size becomes one more measured trial."""
    reserve = 1.0  # seconds kept for writing the results
    if bench.left() < 8 * bench.round_s:
        log.info("batch-size finder skipped: not enough budget left")
        return None, None
    sizes = bench.bounded(lambda: find_batch_size(
        bench.build_model, bench.bundle, bench.cfg, winner.overrides,
        seconds_per_size=bench.round_s, max_size=BATCH_GROWTH * bench.cfg.data.batch_size,
        time_left=lambda: bench.left() - reserve), what="batch-size finder")
    if sizes is None:
        return None, None
    ratio = sizes.speed_vs_start
    start = bench.cfg.data.batch_size
    if sizes.recommended == start or start not in ratio or sizes.recommended not in sizes.trials \
            or ratio[sizes.recommended] < (1 + MIN_GAIN) * ratio[start]:
        return sizes, None
    change = Variant(f"batch {sizes.recommended} (lr {sizes.new_lr:.3g}, {sizes.lr_rule})",
                     {"data": {"batch_size": sizes.recommended}, "optim": {"lr": sizes.new_lr}},
                     lossless=False)
    trial = sizes.trials[sizes.recommended]
    trial.name = f"{winner.name} + batch {sizes.recommended}"
    trial.variants = winner.variants + [change.name]
    trial.overrides = merge(winner.overrides, change.overrides)
    trial.lossless, trial.comparable = False, False
    trial.speedup = winner.speedup * ratio[sizes.recommended] / ratio[start]
    if start in sizes.trials:  # the finder measured both sizes in the same rounds
        found = interval(paired_ratios(trial.round_rates, sizes.trials[start].round_rates))
        if found is not None:
            trial.ratio_interval = list(found)
            trial.speedup_interval = [winner.speedup * found[0], winner.speedup * found[1]]
        trial.spread = spread(trial.round_rates)
        trial.noisy = (trial.spread or 0) > NOISY_CV
    bench.record(trial)
    return sizes, trial


def _greedy_combinations(bench: _Bench, variants: list[Variant],
                         singles: dict[str, TrialResult]) -> None:
    """Start from the best single; try adding each next-best single, keep it if it helps.

    Each candidate is measured in rounds against the current best, so the decision rests on
    paired ratios, not on two measurements taken at different times.
    """
    by_name = {v.name: v for v in variants}
    base = bench.trials[0]
    limit = base.projected_seconds

    def worth_combining(t: TrialResult) -> bool:
        return _eligible(t) and (t.projected_seconds < limit or t.lossless
                                 and t.projected_seconds < limit * (1 + NEUTRAL))

    ranked = sorted(filter(worth_combining, singles.values()), key=lambda t: t.projected_seconds)
    if not ranked:
        return
    current, chosen = ranked[0], [by_name[ranked[0].name]]
    for single in ranked[1:]:
        candidate = by_name[single.name]
        taken = set().union(*(v.keys() for v in chosen))
        if candidate.keys() & taken:
            continue  # e.g. fused vs foreach: the better of the two is already in
        trial = bench.measure([chosen, chosen + [candidate]], reference=current)[0]
        beats = trial.ratio_interval is not None and trial.ratio_interval[0] > 1.0
        if _eligible(trial) and beats and trial.projected_seconds < \
                current.projected_seconds * (1 - MIN_GAIN):
            current, chosen = trial, chosen + [candidate]
