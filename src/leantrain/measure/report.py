"""Human-readable tables for run summaries."""

from __future__ import annotations

from typing import Any

from .load import busy_line
from .timing import format_breakdown


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: list[tuple[str, str]], title: str | None = None) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] if title else []
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _visibility_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the time went, how much of the device was used, what the machine was doing."""
    rows = []
    breakdown = summary.get("step_breakdown")
    if breakdown:
        rows.append(("step time", format_breakdown(breakdown)))
        if "advice" in breakdown:
            rows.append(("  data wait > 20%, try", breakdown["advice"]))
    if summary.get("mfu") is not None:
        estimate = " (peak is an estimate)" if summary["peak_source"].startswith("estimate") \
            else ""
        rows.append(("MFU", f"{summary['mfu']:.1%} of {summary['peak_flops_per_second'] / 1e12:.2f}"
                            f" TFLOP/s{estimate}; achieved "
                            f"{summary['achieved_flops_per_second'] / 1e9:,.1f} GFLOP/s"))
    elif summary.get("peak_source"):
        rows.append(("MFU", f"n/a: {summary['peak_source']}"))
    tuning = summary.get("loader_tuning")
    if tuning and tuning["measured"]:
        rows.append(("loader (measured)", f"{tuning['choice']} in {tuning['seconds']:.1f} s"))
    elif tuning:
        rows.append(("loader", tuning["note"]))
    monitor = summary.get("monitor")
    if monitor and monitor.get("samples"):
        cpu, rss = monitor["cpu_percent"], monitor["rss_bytes"]
        rows.append(("CPU use (all cores)", f"mean {cpu['mean']:.0f}%, max {cpu['max']:.0f}%; "
                                            f"RSS max {human_bytes(rss['max'])}"))
        if "gpu_util_percent" in monitor:
            gpu = monitor["gpu_util_percent"]
            rows.append(("GPU use", f"mean {gpu['mean']:.0f}%, max {gpu['max']:.0f}%; power max "
                                    f"{monitor['gpu_power_watts']['max']:.0f} W"))
        else:
            rows.append(("GPU use", monitor["gpu"]))
    return rows


def _result_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The validation figures the run's task has (accuracy, MAE, perplexity, bits per byte)."""
    rows = []
    if summary.get("val_accuracy") is not None or summary.get("task") in (None, "classification"):
        metric = summary.get("metric") or "accuracy"  # e.g. "per-label accuracy (...)"
        rows.append((f"validation {metric}", _fmt(summary["val_accuracy"], ".2%")))
    if summary.get("val_mae") is not None:
        rows.append(("validation MAE", f"{summary['val_mae']:.4f}"))
    rows.append(("validation loss", _fmt(summary["val_loss"], ".4f")))
    if summary.get("val_task_loss") is not None:
        rows.append(("  of which the task's", f"{summary['val_task_loss']:.4f} (auxiliary "
                                              f"terms {summary['val_aux_loss']:.4f})"))
    if summary.get("loss"):
        rows.append(("loss is", summary["loss"]))
    if summary.get("evaluation"):
        rows.append(("evaluation", summary["evaluation"]))
    if summary.get("val_perplexity") is not None:
        rows.append(("validation perplexity", f"{summary['val_perplexity']:.2f}"))
    if summary.get("val_bits_per_byte") is not None:
        rows.append(("validation bits per byte", f"{summary['val_bits_per_byte']:.3f}"))
    return rows


def _compile_rows(found: dict[str, Any], steps: int) -> list[tuple[str, str]]:
    """What compiling did and whether it paid, from `run.compiling`'s report."""
    if found.get("note"):
        return [("compile", found["note"])]
    rows = [("compile", found["description"])]
    eager, compiled = found.get("eager_step_seconds"), found.get("compiled_step_seconds")
    if eager and compiled:
        steps_to_pay = found.get("break_even_steps")
        verdict = ("never pays: compiled steps are not faster" if steps_to_pay is None else
                   f"pays after {steps_to_pay:,} steps (this run: {steps:,}; "
                   f"{'paid' if steps >= steps_to_pay else 'not paid'})")
        rows.append(("compile pays?", f"{eager * 1e3:.2f} ms eager -> {compiled * 1e3:.2f} ms "
                                      f"compiled per step; {verdict}"))
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: results first, then each technique with applied / not applied."""
    rows = _result_rows(summary)
    if summary.get("task") not in (None, "classification"):
        rows.insert(0, ("task", summary["task"]))
    rows += [
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("wall time (loop)", _fmt(summary["train_seconds"], ".2f", " s")),
        ("samples/s (steps)", _fmt(summary["samples_per_second"], ",.0f")),
    ]
    if summary.get("tokens_per_second") is not None:
        rows.append(("tokens/s (steps)", _fmt(summary["tokens_per_second"], ",.0f")))
    rows += [
        (f"peak memory ({summary['peak_memory_kind']})", human_bytes(summary["peak_memory_bytes"])),
        ("train loader", summary["train_loader"]),
    ]
    rows += [(label, summary[key]) for label, key in (
        ("optimizer", "optimizer"), ("lr schedule", "schedule"), ("learning rate", "lr_advice"))
        if summary.get(key)]
    rows += _visibility_rows(summary)
    if summary.get("compile_seconds") is not None:
        rows.append(("compile time", f"{summary['compile_seconds']:.1f} s (not in samples/s)"))
    if summary.get("compile"):
        rows += _compile_rows(summary["compile"], summary.get("steps") or 0)
    target = f"{summary['target_acc']:.1%}" if summary.get("target_acc") is not None \
        else summary.get("target")
    if target is not None:
        reached = summary.get("time_to_target_seconds")
        rows.append((f"time to {target}", _fmt(reached, ".2f", " s") if reached is not None
                     else "not reached"))
    if summary.get("stop_reason"):
        rows.append(("stopped", summary["stop_reason"]))
    busy = busy_line(summary.get("load"))
    if busy:
        rows.append(("machine", busy))
    rows += _deciding_rows(summary.get("plan_measurement"))
    rows.append(("techniques", ""))
    rows += [(f"  {name}", outcome) for name, outcome in summary["plan"]["outcomes"].items()]
    return table(rows, "leantrain run summary")


def _deciding_rows(record: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What deciding the plan on the run's first steps cost, beside what it projects to gain."""
    if not record or not record.get("in_run"):
        return []
    cost, gain = record.get("cost_s"), record.get("gain_s")
    said = f"on its first {record['steps']} steps (each candidate's windows real steps)"
    if cost is not None:
        said += f"; they lost ~{max(cost, 0.0):.1f} s against the chosen plan"
    if gain:
        said += f", which gains ~{gain:.1f} s over the rule's in the rest of the run"
    return [("plan decided", said)]
