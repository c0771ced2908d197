"""A short `torch.profiler` profile of training steps: the top operators and a Chrome trace.

The profile shows which operators the time goes to (open the trace in chrome://tracing or
https://ui.perfetto.dev for the timeline). Profiling slows the steps it records, so throughput
and the step-time breakdown are measured on unprofiled steps elsewhere, never from here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def profile_steps(step: Callable[[], None], steps: int, trace_path: Path, cuda: bool,
                  top: int = 12) -> list[dict[str, Any]]:
    """Run `step` `steps` times under the profiler; write the trace; return the top operators.

    Operators are ranked by their own (self) time on the device that did the work: CUDA time
    when profiling a GPU run, CPU time otherwise.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    events = prof.key_averages()
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, device_key, 0), reverse=True)
    total = sum(getattr(e, device_key, 0) for e in events) or 1
    rows = []
    for e in ranked[:top]:
        self_us = getattr(e, device_key, 0)
        rows.append({"name": e.key, "calls": e.count, "self_ms": self_us / 1000,
                     "share": self_us / total, "cpu_total_ms": e.cpu_time_total / 1000})
    return rows
