"""A run's metric logs: JSON lines for scripts, TensorBoard event files for people."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

METRICS_NAME = "metrics.jsonl"


class RunLog:
    """Append-only metrics, written to `<out>/metrics.jsonl` and `<out>/tensorboard/`."""

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out_dir / METRICS_NAME
        self.handle = self.path.open("a")
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.lock = threading.Lock()  # the resource monitor logs from its own thread

    def log(self, kind: str, step: int, **values: Any) -> None:
        with self.lock:
            if self.handle.closed:
                return
            self.handle.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
            self.handle.flush()
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        with self.lock:
            self.handle.close()
            self.writer.close()


def truncate_after(out_dir: Path, step: int) -> None:
    """Drop records past `step`: a resumed run re-logs the steps after its checkpoint."""
    path = out_dir / METRICS_NAME
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
