"""Per-rank heartbeats under `leantrain launch`: which rank stopped making progress.

When one rank hangs (a stuck kernel, a deadlocked data worker, an infinite loop in a custom
forward), the others wait in a collective until its timeout and fail first: torchrun's report
then blames a victim. So each rank records where it is (optimizer step and phase) in a small
file that launch gives it (`LEANTRAIN_HEARTBEATS`), overwritten in place (a few bytes, no
fsync: microseconds per phase). After a failure, the rank furthest behind is the stuck one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HEARTBEATS_ENV = "LEANTRAIN_HEARTBEATS"
PHASES = ("data", "forward", "backward", "optimizer")  # in step order
_WIDTH = 96  # fixed-width records: a rewrite in place never leaves a longer old tail


class Heartbeat:
    """Writes this rank's position; a no-op outside launch."""

    def __init__(self, rank: int):
        folder = os.environ.get(HEARTBEATS_ENV)
        self.fd: int | None = None
        if folder:
            path = Path(folder) / f"rank{rank}.json"
            self.fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)

    def beat(self, step: int, phase: str) -> None:
        if self.fd is not None:
            record = json.dumps({"step": step, "phase": phase, "time": time.time()})
            os.pwrite(self.fd, record.ljust(_WIDTH).encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read(folder: str | Path) -> dict[int, dict]:
    """rank -> its last record, for the ranks that wrote one."""
    found = {}
    for path in Path(folder).glob("rank*.json"):
        try:
            found[int(path.stem[4:])] = json.loads(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return found


def furthest_behind(records: dict[int, dict]) -> tuple[int, dict] | None:
    """The rank at the earliest (step, phase), when the ranks are not all at the same place."""
    if len(records) < 2:
        return None

    def place(item):
        record = item[1]
        return record["step"], PHASES.index(record["phase"]) if record["phase"] in PHASES else 0

    ordered = sorted(records.items(), key=place)
    return ordered[0] if place(ordered[0]) < place(ordered[-1]) else None
