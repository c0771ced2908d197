"""Batch-size finder: the fastest batch that fits, from sizes it actually trained with.

Every size considered is run for real (forward, backward and optimizer step, several steps,
through the trainer's own step) and timed; a size that runs out of memory, or whose peak goes
past the memory limit less a safety margin, does not fit. The search doubles from the current
size until a size does not fit, then bisects the gap. The recommendation is the fastest size
that fits; sizes within `NEAR` of the best count as equally fast and the smallest of them wins,
since a bigger batch changes the optimisation more. Never a size it did not run.

When the batch changes, the learning rate follows a stated rule: linear scaling for SGD
(Goyal et al., 2017), square-root scaling for Adam and AdamW.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..data import DataBundle
from ..data.streams import is_stream
from ..errors import LeantrainError
from ..measure import clock
from ..measure.memory import MARGIN, available_ram_bytes, cuda_memory_bytes, current_rss_bytes
from ..run.plan import select_device
from ..techniques.variant import Variant
from .memory_estimate import MemoryEstimate
from .trials import (
    TrialResult,
    TrialSettings,
    interleave,
    merge_rounds,
    paired_speedup,
    run_trial,
)

log = logging.getLogger(__name__)

NEAR = 0.05  # sizes within 5% of the best samples/s are treated as equally fast
MIN_STEPS_PER_EPOCH = 4  # sizes are capped so that an epoch still has this many steps
STREAM_CAP = 65_536  # the largest size searched over a stream (--max-size sets another)
BISECTIONS = 3
COMPARED = 3  # the largest sizes that fit are timed against the smallest in rounds
ROUNDS = 5


@dataclass
class BatchSizeResult:
    start: int
    tried: list[dict[str, Any]]  # per size: batch_size, fits, samples_per_second, peak, reason
    largest_fit: int
    recommended: int
    recommended_rule: str
    lr: float
    new_lr: float
    lr_rule: str
    memory_limit_bytes: int | None
    memory_kind: str
    cap: int
    speed_vs_start: dict[int, float] = field(default_factory=dict)  # paired, median of rounds
    notes: list[str] = field(default_factory=list)
    memory: MemoryEstimate | None = None  # the estimate at the starting size, when asked
    trials: dict[int, TrialResult] = field(default_factory=dict, repr=False)  # the comparison
    load: dict[str, Any] | None = None  # what else used the machine while it timed

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["trials"]  # `tried` and `speed_vs_start` hold their figures
        return out


def scale_lr(lr: float, optimizer: str, old_batch: int, new_batch: int) -> tuple[float, str]:
    ratio = new_batch / old_batch
    if optimizer == "sgd":
        return lr * ratio, f"linear scaling for SGD: lr x {new_batch}/{old_batch}"
    return lr * math.sqrt(ratio), f"square-root scaling for {optimizer}: lr x sqrt({new_batch}/" \
                                  f"{old_batch})"


def available_memory(device_type: str) -> tuple[int | None, str]:
    """What the process may grow to: device memory on CUDA, current RSS + MemAvailable on CPU."""
    if device_type == "cuda":
        return cuda_memory_bytes(torch.device("cuda")), "CUDA device memory (total)"
    rss, avail = current_rss_bytes(), available_ram_bytes()
    if rss is None or avail is None:
        return None, "unknown (no /proc): only out-of-memory errors limit the size"
    return rss + avail, "process RSS now + the machine's available RAM"


def _is_memory_failure(trial: TrialResult) -> bool:
    text = trial.reason.lower()
    return trial.status == "too big" or "out of memory" in text or "can't allocate" in text


def _run_size(size: int, build_model: Callable[[], nn.Module], bundle: DataBundle,
              cfg: TrainConfig, overrides: dict[str, Any], seconds: float) -> TrialResult:
    """Train `size`-sample batches for real under the plan `overrides`, and time them."""
    variant = Variant(f"batch {size}", {"data": {"batch_size": size}})
    return run_trial(variant.name, [variant], overrides, build_model, bundle, cfg,
                     TrialSettings(seconds=seconds, check_steps=1))


def _round(size: int) -> int:
    return size if size < 16 else size // 8 * 8


def find_batch_size(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
                    overrides: dict[str, Any] | None = None, memory_limit: int | None = None,
                    seconds_per_size: float = 1.5, max_size: int | None = None,
                    time_left: Callable[[], float] | None = None) -> BatchSizeResult:
    """Search batch sizes under the config's plan, with `overrides` on top (the bench's winner).

    `memory_limit` in bytes (default: what the device or machine has); `time_left()` lets a
    caller with a budget stop the search early: the answer then comes from the sizes tried.
    """
    start, overrides = cfg.data.batch_size, overrides or {}
    device_type = overrides.get("plan", {}).get("device") or select_device(cfg.plan.device) \
        .device.type
    limit, kind = (memory_limit, "given limit") if memory_limit else available_memory(device_type)
    if is_stream(bundle.train):  # no epoch to keep steps in: memory and speed decide
        cap, cap_reason = STREAM_CAP, "the largest size searched over a stream"
    else:
        cap = max(len(bundle.train) // MIN_STEPS_PER_EPOCH, 1)
        cap_reason = f"a quarter of the training set, so an epoch has at least " \
                     f"{MIN_STEPS_PER_EPOCH} steps"
    if max_size and max_size < cap:
        cap, cap_reason = max_size, "the largest size asked for"
    results: dict[int, TrialResult] = {}
    notes: list[str] = []
    longest = [2 * seconds_per_size + 1]  # the wall time of a size's trial, as measured

    def run_size(size: int) -> TrialResult:
        began = clock.now()
        trial = _run_size(size, build_model, bundle, cfg, overrides, seconds_per_size)
        longest[0] = max(longest[0], clock.now() - began)
        return trial

    def fits(size: int) -> bool:
        if size not in results:
            trial = run_size(size)
            if trial.measured and limit and trial.peak_memory_bytes > (1 - MARGIN) * limit:
                trial.status = "too big"
                trial.reason = (f"peak {trial.peak_memory_bytes / 2**20:.0f} MiB is over "
                                f"{1 - MARGIN:.0%} of the limit ({limit / 2**20:.0f} MiB)")
            results[size] = trial
            log.info("batch %d: %s", size, f"{trial.samples_per_second:,.0f} samples/s"
                     if trial.measured else f"does not fit ({trial.status}: {trial.reason})")
        return results[size].measured

    def out_of_time() -> bool:  # another trial would not end within the time left
        return time_left is not None and time_left() < longest[0]

    size = min(start, cap)
    while not fits(size):  # the starting size itself may not fit: halve until one does
        if not _is_memory_failure(results[size]):
            raise LeantrainError(f"batch {size} cannot run: {results[size].reason}")
        if size == 1:
            raise LeantrainError(f"not even batch size 1 fits: {results[1].reason}")
        size = max(size // 2, 1)
    low, high = size, None
    while high is None and low < cap and not out_of_time():
        nxt = min(low * 2, cap)
        if fits(nxt):
            low = nxt
        else:
            high = nxt
    for _ in range(BISECTIONS):
        if high is None or high - low <= max(8, low // 8) or out_of_time():
            break
        mid = _round((low + high) // 2)
        if mid <= low:
            break
        low, high = (mid, high) if fits(mid) else (low, mid)
    if low >= cap:
        notes.append(f"capped at {cap} ({cap_reason}); larger sizes were not tried")
    fitting = sorted(size for size, t in results.items() if t.measured)
    contenders = sorted({fitting[0]} | set(fitting[-COMPARED:]))
    compared = _compare_sizes(contenders, run_size, out_of_time)
    if out_of_time():
        notes.append("the time budget ended the search; the answer comes from the sizes tried")
    return _recommend(start, fitting[0], results, compared, limit, kind, cap, cfg, notes)


def _compare_sizes(sizes: list[int], run_size: Callable[[int], TrialResult],
                   out_of_time: Callable[[], bool]) -> dict[int, list[TrialResult]]:
    """Time the contenders in interleaved rounds (machine speed drifts between trials)."""
    def measure(label: str, r: int) -> TrialResult | None:
        if out_of_time():
            return None
        return run_size(int(label))

    rounds = interleave([str(s) for s in sizes], ROUNDS, measure)
    return {int(label): measured for label, measured in rounds.items() if measured}


def _recommend(start: int, reference: int, results: dict[int, TrialResult],
               compared: dict[int, list[TrialResult]], limit: int | None, kind: str, cap: int,
               cfg: TrainConfig, notes: list[str]) -> BatchSizeResult:
    """The smallest size within NEAR of the fastest, by paired ratios to `reference`."""
    ref_rounds = compared.get(reference, [])
    speed: dict[int, float] = {}
    for size, measured in compared.items():
        ratio = paired_speedup(measured, ref_rounds)
        if ratio is not None:
            speed[size] = ratio
    if not speed:  # no comparison round ran (budget): fall back on the search's own timings
        base = results[reference].samples_per_second
        speed = {size: t.samples_per_second / base for size, t in results.items() if t.measured}
        notes.append("no comparison rounds ran: ranked on single search timings")
    best = max(speed.values())
    recommended = min(size for size, v in speed.items() if v >= (1 - NEAR) * best)
    lr = cfg.optim.resolved().lr
    new_lr, lr_rule = scale_lr(lr, cfg.optim.name, start, recommended)
    if recommended == start:
        new_lr, lr_rule = lr, "batch size unchanged: learning rate unchanged"
    tried = [{"batch_size": size, "fits": t.measured, "samples_per_second": t.samples_per_second,
              "peak_memory_bytes": t.peak_memory_bytes, "status": t.status, "reason": t.reason}
             for size, t in sorted(results.items())]
    return BatchSizeResult(
        start=start, tried=tried, largest_fit=max(s for s, t in results.items() if t.measured),
        recommended=recommended,
        recommended_rule=f"the smallest size within {NEAR:.0%} of the fastest (samples/s "
                         f"relative to batch {reference}, median of interleaved rounds)",
        lr=lr, new_lr=new_lr, lr_rule=lr_rule, memory_limit_bytes=limit,
        memory_kind=kind, cap=cap, speed_vs_start=speed, notes=notes,
        trials={size: merge_rounds(m) for size, m in compared.items()})
