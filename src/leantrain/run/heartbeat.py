"""Per-rank heartbeats and the launchers' notes to each other under `leantrain launch`.

When one rank hangs (a stuck kernel, a deadlocked data worker, an infinite loop in a custom
forward), the others wait in a collective until its timeout and fail first: torchrun's report
then blames a victim. So each rank records where it is (optimizer step and phase) in a small
file that launch gives it (`LEANTRAIN_HEARTBEATS`), overwritten in place (a few bytes, no
fsync: microseconds per phase). After a failure, the rank furthest behind is the stuck one.

On several nodes each launcher sees only its own ranks: a rank killed on node 1 leaves node 0's
ranks failing on a closed connection, and node 0 once blamed its own rank 0. So a multi-node
launch keeps these notes in the run folder (`.launch/`, which every node must share anyway):
the heartbeats, each launcher's failure report (`failed-*.json`), and the marks of the nodes
waiting at the rendezvous (`node-*`, refreshed while they wait), so every node names the same
rank and a waiting node can say how many have arrived.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

HEARTBEATS_ENV = "LEANTRAIN_HEARTBEATS"
LAUNCH_NAME = ".launch"  # in a run folder: the launchers' shared notes
PHASES = ("data", "forward", "backward", "optimizer")  # in step order
_WIDTH = 160  # fixed-width records: a rewrite in place never leaves a longer old tail
ARRIVED_FRESH_S = 10.0  # a waiting node refreshes its mark more often than this


def host() -> str:
    return socket.gethostname()[:40]


class Heartbeat:
    """Writes this rank's position; a no-op outside launch."""

    def __init__(self, rank: int):
        folder = os.environ.get(HEARTBEATS_ENV)
        self.fd: int | None = None
        self.host = host()
        if folder:
            path = Path(folder) / f"rank{rank}.json"
            self.fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)

    def beat(self, step: int, phase: str) -> None:
        if self.fd is not None:
            record = json.dumps({"step": step, "phase": phase, "time": time.time(),
                                 "host": self.host})
            os.pwrite(self.fd, record.ljust(_WIDTH).encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _records(paths, since: float) -> list[tuple[Path, object]]:
    found = []
    for path in paths:
        try:
            if path.stat().st_mtime >= since:
                found.append((path, json.loads(path.read_text().strip())))
        except (OSError, ValueError):
            continue
    return found


def read(folder: str | Path, since: float = 0.0) -> dict[int, dict]:
    """rank -> its last record, for the ranks that wrote one since `since` (a shared folder
    keeps an earlier job's)."""
    return {int(path.stem[4:]): record
            for path, record in _records(Path(folder).glob("rank*.json"), since)
            if isinstance(record, dict) and path.stem[4:].isdigit()}


def furthest_behind(records: dict[int, dict]) -> tuple[int, dict] | None:
    """The rank at the earliest (step, phase), when the ranks are not all at the same place."""
    if len(records) < 2:
        return None

    def place(item):
        record = item[1]
        return record["step"], PHASES.index(record["phase"]) if record["phase"] in PHASES else 0

    ordered = sorted(records.items(), key=place)
    return ordered[0] if place(ordered[0]) < place(ordered[-1]) else None


def _own_name(prefix: str) -> str:
    return f"{prefix}-{host()}-{os.getpid()}"


def report_failures(folder: Path, failures: list[dict]) -> None:
    """This launcher's failed ranks, for the other nodes' launchers (written whole: a
    temporary name, then renamed)."""
    path = folder / f"{_own_name('failed')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(failures))
    tmp.replace(path)


def others_failures(folder: Path, since: float) -> list[dict]:
    """The failed ranks the other nodes' launchers reported since `since`."""
    mine = f"{_own_name('failed')}.json"
    return [failure for path, records in _records(folder.glob("failed-*.json"), since)
            if path.name != mine and isinstance(records, list) for failure in records]


def mark_arrived(folder: Path) -> None:
    """This node waits at the rendezvous (called again while it waits: a mark older than
    ARRIVED_FRESH_S is a node that left)."""
    (folder / _own_name("node")).touch()


def arrived(folder: Path) -> int:
    """Nodes waiting at the rendezvous now, this one included."""
    fresh = time.time() - ARRIVED_FRESH_S
    return sum(1 for path in folder.glob("node-*") if _fresh(path, fresh))


def _fresh(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def leave(folder: Path) -> None:
    (folder / _own_name("node")).unlink(missing_ok=True)
