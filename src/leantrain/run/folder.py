"""A run folder belongs to one run at a time: what may be trained into it, and its lock.

A fresh run needs an empty (or new) folder: files from something else would mix with the
run's own (two TensorBoard files, a metrics.jsonl with repeated steps). A resume needs the
run's checkpoint. While a run trains, `.lock` holds its PID, host and start time, created
exclusively (O_EXCL), so a second run on the same folder stops at once; a lock left by a
process that died (same host, PID gone) is stale and taken over, with a note in the log.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from .. import distributed
from ..checkpoint import CHECKPOINT_NAME, remove_partial_writes, require_recorded_hash
from ..config import CONFIG_NAME
from ..distributed import DistContext
from ..errors import LeantrainError
from . import sharded
from .heartbeat import LAUNCH_NAME
from .logs import METRICS_NAME, TENSORBOARD_NAME

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _holder(lock: Path) -> dict | None:
    try:
        found = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None  # being written this instant, or garbage: not a live holder we can name
    return found if isinstance(found, dict) else None


class RunLock:
    """The exclusive lock on a run folder, held for the length of a run (a context manager)."""

    def __init__(self, folder: Path, created: bool = False):
        # created: this run made the folder, so it removes it again if it leaves nothing there
        self.folder, self.path, self.held, self.created = folder, folder / LOCK_NAME, False, \
            created

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            except OSError as exc:
                raise LeantrainError(f"run folder {self.folder}: cannot write there "
                                     f"({exc.strerror})") from exc
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise LeantrainError(f"run folder {self.folder}: another run took its lock just now")

    def _refuse_or_clear(self) -> None:
        holder = _holder(self.path)
        if holder and holder.get("host") == socket.gethostname() and \
                isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            log.warning("run folder %s: removing the stale lock of process %d (no longer "
                        "running)", self.folder, holder["pid"])
            self.path.unlink(missing_ok=True)
            return
        who = (f"process {holder.get('pid')} on {holder.get('host')} since "
               f"{holder.get('started')}") if holder else "another process"
        raise LeantrainError(f"run folder {self.folder} is in use by {who}; wait for it, or "
                             f"remove {self.path} if that run is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created and not any(self.folder.iterdir()):
                self.folder.rmdir()  # a run that failed before writing leaves no folder

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# what a run writes before its first checkpoint: a run killed (or failed) then leaves these
LEFTOVERS = frozenset({CONFIG_NAME, METRICS_NAME, TENSORBOARD_NAME, LOCK_NAME})


def leftovers(folder: Path) -> list[Path]:
    """The files of a run that ended before its first checkpoint (its config.yaml among them),
    when the folder holds nothing else: the same command starts afresh over them, so a
    scheduler that re-runs a pre-empted job is never stuck. Empty when there are none."""
    if not folder.is_dir() or (folder / CHECKPOINT_NAME).exists() \
            or (folder / sharded.FOLDER).exists():
        return []
    found = [p for p in folder.iterdir() if not (p.name.startswith(".") and
                                                 p.name.endswith(".tmp")) and
             p.name != LAUNCH_NAME]
    names = {p.name for p in found}
    return found if CONFIG_NAME in names and names <= LEFTOVERS else []


def clear_leftovers(folder: Path) -> None:
    stale = [p for p in leftovers(folder) if p.name != LOCK_NAME]
    if stale:
        log.warning("%s holds what a run left before its first checkpoint (%s): starting "
                    "afresh over it", folder, ", ".join(sorted(p.name for p in stale)))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:  # a file, or a link (to a folder too: the link goes, never what it points to)
            path.unlink(missing_ok=True)
    remove_partial_writes(folder)


def checkpoint_of(folder: Path) -> Path | None:
    """The file that says the folder holds a run to resume: its checkpoint.pt, or the state
    of its last sharded checkpoint (`run.sharded`); None when it has neither."""
    if (folder / CHECKPOINT_NAME).is_file():
        return folder / CHECKPOINT_NAME
    shards = sharded.latest(folder)
    return shards / sharded.STATE if shards is not None else None


def check(folder: Path, resume: bool, verify: bool = True) -> None:
    """Refuse a folder this run may not train into (before anything is measured or written);
    with `verify`, a checkpoint to resume needs its recorded SHA-256."""
    if folder.exists() and not folder.is_dir():
        raise LeantrainError(f"run folder {folder} is a file; choose another folder")
    lock = folder / LOCK_NAME
    if lock.exists():
        RunLock(folder)._refuse_or_clear()  # in use: one line naming the holder
    found = checkpoint_of(folder) if folder.is_dir() else None
    if resume:
        if found is None:
            hint = (": the run there ended before its first checkpoint; run the command that "
                    "started it again (it starts afresh)" if leftovers(folder) else
                    " in that folder")
            raise LeantrainError(f"resume {folder}: no {CHECKPOINT_NAME}{hint}")
        if verify:
            require_recorded_hash(found)
        return
    if found is not None:
        raise LeantrainError(f"{folder} already holds a run; continue it with --resume {folder} "
                             "or choose another folder")
    if folder.is_dir() and not leftovers(folder) \
            and any(p.name not in (LOCK_NAME, LAUNCH_NAME) for p in folder.iterdir()):
        raise LeantrainError(f"run folder {folder} holds files but no {CHECKPOINT_NAME}: it is "
                             "not a run to resume; choose an empty or new folder")


def check_shared(folder: Path, dist: DistContext) -> None:
    """Every rank must see the run folder rank 0 writes: each writes its checkpoint shards
    there and reads them back at a resume. Rank 0 writes a nonce there, every rank reads it
    back from its own run folder; the ranks that cannot are named at once (a resume on folders
    that were not shared once failed on node 1 at once and on node 0 only after 60 s, blaming
    itself; nodes given different --out folders split every checkpoint between them)."""
    if not dist.active or dist.world_size == 1:
        return
    nonce = uuid.uuid4().hex if dist.is_main else None
    probe = folder / f".shared-{os.getpid()}.tmp"  # (.tmp: a kill leaves nothing a resume keeps)
    if dist.is_main:
        probe.write_text(nonce)
    nonce, name = distributed.gather_objects((nonce, probe.name), dist)[0]  # (a barrier)
    try:
        seen = (folder / name).read_text() == nonce
    except OSError:
        seen = False
    views = distributed.gather_objects((seen, socket.gethostname(), str(folder)), dist)
    if dist.is_main:
        probe.unlink(missing_ok=True)
    main_folder = views[0][2]  # (what rank 0 was given: the others must see it)
    blind = [f"rank {rank} on {host}" + (f" (its run folder: {where})" if where != main_folder
                                         else "")
             for rank, (ok, host, where) in enumerate(views) if not ok]
    if blind:
        raise LeantrainError(f"run folder {main_folder} is not shared: {', '.join(blind)} cannot "
                             f"see what rank 0 on {views[0][1]} writes there; give every node "
                             "the same --out, a folder on a file system every node mounts")


def claim(folder: Path, resume: bool, verify: bool = True) -> RunLock:
    """Check the folder, create it and lock it; release the lock (or use `with`) when done."""
    check(folder, resume, verify)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, under a file, no space
        raise LeantrainError(f"run folder {folder}: cannot create it ({exc.strerror})") from exc
    try:
        lock = RunLock(folder, created).acquire()
    except LeantrainError:
        if created:
            folder.rmdir()
        raise
    if not resume:
        clear_leftovers(folder)  # under the lock: no other run is writing them
    return lock
