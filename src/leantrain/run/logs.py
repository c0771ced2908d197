"""A run's metric logs: JSON lines for scripts, TensorBoard event files for people, and the
resource monitor that samples CPU/GPU use into them."""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes
from ..errors import LeantrainError
from ..measure.monitor import ResourceMonitor

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"


class RunLog:
    """Append-only metrics, written to `<out>/metrics.jsonl` and `<out>/tensorboard/`."""

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / METRICS_NAME
        self.handle = self.path.open("a")
        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_NAME))
        self.lock = threading.Lock()  # the resource monitor logs from its own thread
        self.failed: str | None = None  # why a write failed (a full disk): the run stops

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Append a record; a write that fails (a full disk) stops the run in one line, at
        the training thread's next record (the monitor's thread only notes it)."""
        with self.lock:
            if self.failed is None and not self.handle.closed:
                try:
                    self.handle.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
                    self.handle.flush()
                    for name, value in values.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool):
                            self.writer.add_scalar(f"{kind}/{name}", value, step)
                except OSError as exc:
                    why = "no space left on the device" if exc.errno == errno.ENOSPC \
                        else exc.strerror or str(exc)
                    self.failed = f"cannot write {self.path} or its TensorBoard log: {why}"
            if self.failed and threading.current_thread() is threading.main_thread():
                raise LeantrainError(f"{self.failed}; the last checkpoint is kept: free some "
                                     "space and continue with --resume")

    def close(self) -> None:
        with self.lock:
            for closing in (self.handle.close, self.writer.close):
                try:
                    closing()
                except OSError:  # (a full disk: already said by `log`, or by the next write)
                    pass


class NullLog:
    """What a run without a folder (or a rank other than 0) logs to."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def logged_lines(out_dir: Path) -> int:
    """The complete records in metrics.jsonl now (a line the monitor's thread is still
    writing is not one)."""
    path = out_dir / METRICS_NAME
    return path.read_bytes().count(b"\n") if path.exists() else 0


def truncate_after(out_dir: Path, step: int, lines: int | None = None) -> None:
    """Keep what was logged up to the checkpoint a run resumes from: its first `lines`
    records, or (a checkpoint that did not count them) the records up to `step`. The
    resumed run logs the rest again, each once: an epoch's record logged just after a
    checkpoint at the same step was kept by the step rule and logged twice."""
    path = out_dir / METRICS_NAME
    if not path.exists():
        return
    # bytes, not text: a record that is not UTF-8 (a damaged or edited log) is kept or
    # dropped like any other, never a traceback
    complete = path.read_bytes().split(b"\n")[:-1]  # (the half-written last line of a kill)
    if lines is not None:
        kept = complete[:lines]
    else:
        kept = [line for line in complete if (at := _step_of(line)) is not None and at <= step]
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))


def _step_of(line: bytes) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # (UnicodeDecodeError is a ValueError)
        return None
    return step if isinstance(step, int) else None


def start_monitor(run, sink: Callable[[dict[str, Any]], None]) -> ResourceMonitor | None:
    """CPU/GPU use sampled every `train.monitor_interval_s` into `sink` (rank 0 only; 0: off)."""
    interval, device = run.cfg.train.monitor_interval_s, run.plan.device
    if not interval or not run.dist.is_main:
        return None
    monitor = ResourceMonitor(interval, device, sink=sink)
    if monitor.gpu.error and device.type == "cuda":
        log.info("GPU monitoring off: %s", monitor.gpu.error)
    return monitor.start()
