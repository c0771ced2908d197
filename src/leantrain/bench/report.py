"""What the bench and the finders leave behind: tables, JSON with every raw figure, PNGs, plans."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_text
from ..config import PLAN_FILE_KEYS, merge, read_plan_file
from ..measure.compile_watch import describe
from ..measure.load import LoadReading, busy_line
from ..measure.plots import bar_panels, curve
from ..measure.report import human_bytes
from ..measure.rounds import MIN_ROUNDS
from .batch_size import BatchSizeResult
from .lr_finder import LRFinderResult
from .memory_estimate import format_estimate
from .search import BASELINE_LABEL, BenchResult
from .trials import TrialResult

BENCH_JSON, BENCH_PNG, PLAN_YAML, BASELINE_YAML = ("bench.json", "bench.png", "plan.yaml",
                                                   "baseline.yaml")


def _check_text(t: TrialResult, result: BenchResult) -> str:
    if t.check == "reference":
        return "reference"
    if t.check == "not comparable":
        return "not comparable (other batches)"
    if t.divergence is None:
        return "n/a"
    tol = result.lossless_tol if t.lossless else result.loss_tol
    word = "ok" if t.check == "ok" else "FLAGGED"
    return f"{word} ({t.divergence:.1e} {'<=' if t.check == 'ok' else '>'} {tol:g})"


def ranked(result: BenchResult) -> list[TrialResult]:
    """Measured trials, fastest projected run first; flagged and model-changing ones last."""
    measured = [t for t in result.trials if t.measured]
    return sorted(measured, key=lambda t: (t.check == "flagged" or not t.plannable,
                                           t.projected_seconds))


def _speedup_text(t: TrialResult) -> str:
    text = f"{t.speedup:.2f}x"
    if t.speedup_interval is not None:
        text += f" ({t.speedup_interval[0]:.2f}-{t.speedup_interval[1]:.2f})"
    elif t.name != BASELINE_LABEL:  # a median of one or two rounds: no interval, cannot win
        text += f" (not enough rounds: {len(t.round_rates)} of {MIN_ROUNDS})"
    if t.noisy:
        text += f" NOISY (spread {t.spread:.0%})"
    return text


def _compile_lines(result: BenchResult) -> list[str]:
    """What each compiled trial's torch.compile did, and when it pays against the baseline."""
    lines = []
    for t in result.trials:
        if not t.measured or t.compile is None:
            continue
        steps = t.compile.get("break_even_steps")
        pays = ("never pays against the baseline: its steps are not faster" if steps is None
                else f"pays against the baseline after {steps:,} steps")
        lines.append(f"  {t.name}: compiled in {t.compile_seconds or 0:.1f} s; "
                     f"{describe(t.compile)}; {pays}")
    return ["\ntorch.compile:", *lines] if lines else []


def format_bench(result: BenchResult) -> str:
    rows = [("#", "trial", "samples/s", "speed-up (95% interval)", "projected run",
             "peak memory", "loss check")]
    for i, t in enumerate(ranked(result), start=1):
        mark = " *" if t.name == result.winner else ""
        rows.append((str(i), t.name + mark, f"{t.samples_per_second:,.0f}", _speedup_text(t),
                     f"{t.projected_seconds:.1f} s" + (
                         f" (compile {t.compile_seconds:.0f} s)" if t.compile_seconds else ""),
                     human_bytes(t.peak_memory_bytes), _check_text(t, result)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"leantrain bench on {result.device}: {len(result.trials)} trials in "
             f"{result.elapsed_s:.0f} s (budget {result.budget_s:.0f} s); projected run = "
             f"{result.run_samples:,} samples at the measured rate, plus compilation"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    lines += _compile_lines(result)
    others = [t for t in result.trials if not t.measured]
    if others:
        lines.append("\nnot measured:")
        lines += [f"  {t.name}: {t.status}: {t.reason}" for t in others]
    if result.not_benchmarked:
        lines.append("\nnot benchmarked (not speed techniques):")
        lines += [f"  {name}: {why}" for name, why in result.not_benchmarked.items()]
    winner = result.trial(result.winner)
    lines.append(f"\nwinner (*): {winner.name}: {winner.speedup:.2f}x the baseline's samples/s, "
                 f"peak memory {human_bytes(winner.peak_memory_bytes)} "
                 f"({winner.peak_memory_kind})")
    if not winner.comparable:
        lines.append("  its batch size differs from yours, so its learning rate was scaled (see "
                     "the trial name) and its loss cannot be compared step by step: check its "
                     "accuracy with `leantrain train --plan` (or pass --keep-batch-size)")
    lines.append("a speed-up counts only when its 95% interval lies above 1; a NOISY trial "
                 "(rates spread past 20%, twice) cannot win")
    if result.versus_default:
        lines.append(f"versus the default plan: {result.versus_default['verdict']}")
    if result.load is not None:
        lines.append(LoadReading.from_dict(result.load).describe())
    return "\n".join(lines)


def plan_values(overrides: dict[str, Any]) -> dict[str, Any]:
    """The part of a trial's overrides that a plan file holds."""
    out: dict[str, Any] = {}
    for section, keys in PLAN_FILE_KEYS.items():
        node = overrides.get(section, {})
        picked = {k: v for k, v in node.items() if k in keys}
        if picked:
            out[section] = picked
    return out


def write_plan(path: Path, values: dict[str, Any], header: list[str]) -> None:
    """Write (or update: existing keys are kept unless `values` sets them) a plan file."""
    if path.is_file():
        values = merge(read_plan_file(path), values)
    text = "".join(f"# {line}\n" for line in header)
    atomic_write_text(path, text + yaml.safe_dump(values, sort_keys=False))


def _stamp(what: str) -> str:
    return f"written by `leantrain {what}` on {datetime.date.today().isoformat()}"


def write_bench(result: BenchResult, out_dir: Path, apply_to: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / BENCH_JSON, json.dumps(result.to_dict(), indent=2))
    order = ranked(result)
    winner = result.trial(result.winner)
    bar_panels(
        [t.name for t in order],
        [("speed-up vs baseline (samples/s), 95% interval", [t.speedup for t in order]),
         (f"peak memory, MiB ({order[0].peak_memory_kind})",
          [t.peak_memory_bytes / 2**20 for t in order])],
        out_dir / BENCH_PNG, f"leantrain bench on {result.device}: winner {winner.name}",
        highlight=order.index(winner),
        intervals=[tuple(t.speedup_interval) if t.speedup_interval else None for t in order])
    if result.keep_default:
        header = [_stamp("bench"), result.versus_default["verdict"],
                  "so this plan sets only the device it was measured on: `train --plan` "
                  "runs the default plan there"]
        values: dict[str, Any] = {"plan": {"device": result.device}}
    else:
        header = [_stamp("bench"), f"winner: {winner.name}",
                  f"measured: {winner.speedup:.2f}x the baseline's samples/s on {result.device}",
                  f"versus the default plan: {result.versus_default['verdict']}"
                  if result.versus_default else "not paired with the default plan"]
        values = plan_values(winner.overrides)
    write_plan(out_dir / PLAN_YAML, values, header)
    write_plan(out_dir / BASELINE_YAML, plan_values(result.baseline.overrides),
               [_stamp("bench"), "the baseline: plain fp32 eager loop, per-sample DataLoader"])
    if apply_to is not None:
        write_plan(apply_to, values, header)


def format_batch_sizes(sizes: BatchSizeResult) -> str:
    # the search's samples/s are single timings; the choice is made on the paired, interleaved
    # ratios of the last column, so the table shows both and marks the choice
    lines = ["batch size  samples/s (search)  speed (decides)  peak memory   fits"]
    for t in sizes.tried:
        rate = f"{t['samples_per_second']:,.0f}" if t["samples_per_second"] else "-"
        ratio = sizes.speed_vs_start.get(t["batch_size"])
        speed = f"{ratio:.2f}x" if ratio is not None else "-"
        fits = "yes" if t["fits"] else f"no: {t['reason']}"
        chosen = "  <- recommended" if t["batch_size"] == sizes.recommended else ""
        lines.append(f"{t['batch_size']:>10}  {rate:>18}  {speed:>15}  "
                     f"{human_bytes(t['peak_memory_bytes']):>11}   {fits}{chosen}")
    lines.append(f"\nlargest that fits: {sizes.largest_fit}; memory limit: "
                 f"{human_bytes(sizes.memory_limit_bytes)} ({sizes.memory_kind})")
    lines.append(f"recommended: {sizes.recommended} ({sizes.recommended_rule})")
    lines.append(f"learning rate: {sizes.lr:g} -> {sizes.new_lr:.4g} ({sizes.lr_rule})")
    lines += [f"note: {n}" for n in sizes.notes]
    if sizes.memory is not None:
        est = sizes.memory
        lines += ["", *format_estimate(est.to_dict()),
                  f"  estimated peak at the recommended batch {sizes.recommended}: "
                  f"{human_bytes(est.peak_at(sizes.recommended))}"]
    busy = busy_line(sizes.load)
    return "\n".join(lines + ([busy] if busy else []))


def write_batch_sizes(sizes: BatchSizeResult, out_dir: Path, apply_to: Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "batch_size.json", json.dumps(sizes.to_dict(), indent=2))
    if apply_to is not None:
        write_plan(apply_to, {"data": {"batch_size": sizes.recommended},
                              "optim": {"lr": sizes.new_lr}},
                   [_stamp("find-batch-size"), sizes.recommended_rule, sizes.lr_rule])


def format_lr(result: LRFinderResult) -> str:
    return "\n".join([
        f"swept lr {result.lrs[0]:.2g} .. {result.lrs[-1]:.2g} over {len(result.lrs)} steps "
        f"({result.stop_reason})",
        f"suggested lr: {result.suggestion:.3g} (rule: {result.rule})",
        f"alternative: {result.min_loss_lr:.3g} (the lr of the lowest loss, divided by 10)",
    ])


def write_lr(result: LRFinderResult, out_dir: Path, apply_to: Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "lr_finder.json", json.dumps(result.to_dict(), indent=2))
    curve(result.lrs, [("loss", result.losses), ("smoothed", result.smoothed)],
          out_dir / "lr_finder.png", "LR range test", "learning rate", "training loss",
          log_x=True, mark_x=result.suggestion, mark_label=f"suggested {result.suggestion:.3g}")
    if apply_to is not None:
        write_plan(apply_to, {"optim": {"lr": result.suggestion}},
                   [_stamp("find-lr"), result.rule])
