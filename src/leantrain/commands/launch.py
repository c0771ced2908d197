"""`leantrain launch`: start a training job on several processes with torchrun.

This is torch.distributed.run (torchrun) itself, called in-process with leantrain's defaults:
no restarts unless `--max-restarts N` (each restart then continues from the run's last
checkpoint: `train --resume auto`), and its failure report turned into one line
that names the rank that failed and why. When any rank dies, torchrun's agent stops the
others, so the job ends within seconds rather than hanging in a collective; a rank that is
alive but stuck fails at `train.dist_timeout_s`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import check_processes
from ..errors import LeantrainError, one_line
from . import common

LAUNCHABLE = ("train",)


def nodes_range(text: str) -> tuple[int, int]:
    """--nnodes: "M" (a fixed number of nodes) or "MIN:MAX" (elastic: the job starts with MIN
    and admits nodes up to MAX)."""
    parts = str(text).split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise LeantrainError(f"--nnodes must be M or MIN:MAX with 1 <= MIN <= MAX, got {text}")
    return low, high


def _endpoint(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LeantrainError(f"--rdzv-endpoint must be HOST:PORT (a TCP port 1..65535), got "
                             f"{text}")
    return text


def torchrun_args(nproc: int, nnodes: int | str, node_rank: int, master_addr: str | None,
                  master_port: int | None, command: list[str], max_restarts: int = 0,
                  rdzv_endpoint: str | None = None, rdzv_id: str = "leantrain") -> list[str]:
    """torchrun's command line for running `leantrain <command>` on every rank."""
    low, high = nodes_range(str(nnodes))
    if nproc < 1:
        raise LeantrainError(f"--nproc and --nnodes must be >= 1, got {nproc} and {nnodes}")
    check_processes("--nproc", nproc)
    if not 0 <= max_restarts <= 100:
        raise LeantrainError(f"--max-restarts must be in 0..100, got {max_restarts}")
    if rdzv_endpoint is None and low != high:
        raise LeantrainError("an elastic --nnodes MIN:MAX needs --rdzv-endpoint HOST:PORT (a "
                             "c10d rendezvous every node reaches)")
    if rdzv_endpoint is None and not 0 <= node_rank < high:
        raise LeantrainError(f"--node-rank must be in 0..{high - 1}, got {node_rank}")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise LeantrainError(f"--master-port must be a TCP port, 1..65535, got {master_port}")
    if not command or command[0] not in LAUNCHABLE:
        raise LeantrainError(f"launch runs one of: {', '.join(LAUNCHABLE)}; e.g. leantrain "
                             f"launch --nproc 2 -- train --epochs 3 (got {command or 'nothing'})")
    if max_restarts:
        command = restartable(command)
    span = str(low) if low == high else f"{low}:{high}"
    args = [f"--nproc-per-node={nproc}", f"--nnodes={span}", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.5"]
    if rdzv_endpoint is not None:  # c10d: any node may host it; ranks are given on arrival
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={_endpoint(rdzv_endpoint)}",
                 f"--rdzv-id={rdzv_id}"]
    elif high == 1 and master_addr is None:
        args.append("--standalone")  # a free local port, no address to give
    else:
        if master_addr is None or master_port is None:
            raise LeantrainError("several nodes need --master-addr and --master-port (the "
                                 "address of node 0, reachable from every node), or "
                                 "--rdzv-endpoint HOST:PORT")
        args += [f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                 f"--master-port={master_port}"]
    return [*args, "-m", "leantrain.cli", *command]


def with_run_folder(command: list[str], nnodes: int | str | None) -> list[str]:
    """`train` without --out or --resume, given the run folder its ranks would each name
    for themselves (runs/<time>: ranks that start a second apart named two folders, and the
    job failed as "not shared"): the launcher names it once. On several nodes each node's
    launcher would name its own: there the ranks' check of a shared folder asks for --out."""
    if command[:1] != ["train"] or _option(command, "--out") or _option(command, "--resume") \
            or str(nnodes or 1) != "1":
        return command
    return [*command, "--out", str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))]


def restartable(command: list[str]) -> list[str]:
    """`train` as a restarted job runs it: `--resume auto` on its --out folder (continue from
    its last checkpoint when there is one, start there otherwise)."""
    if any(arg == "--resume" or arg.startswith("--resume=") for arg in command):
        return command
    if not any(arg == "--out" or arg.startswith("--out=") for arg in command):
        raise LeantrainError("--max-restarts needs the train command's --out DIR: the folder a "
                             "restarted job continues from")
    return [*command, "--resume", "auto"]


@dataclass(frozen=True)
class Failure:
    """One failed rank as a launcher saw it (a record other nodes' launchers can read)."""

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    why: str  # its own error line, else torch's
    timestamp: float
    host: str = ""  # set for a rank of another node

    @staticmethod
    def of(rank: int, failure) -> Failure:
        """From torchrun's ProcessFailure."""
        return Failure(rank, failure.local_rank, failure.pid, failure.exitcode, _why(failure),
                       float(failure.timestamp))

    def name(self) -> str:
        where = f"on {self.host}, " if self.host else ""
        return f"rank {self.rank} ({where}local rank {self.local_rank}, pid {self.pid})"


def _why(failure) -> str:
    """The failed rank's own error line (`cli._tell_torchrun` leaves it), else torch's."""
    message = failure.message
    if isinstance(message, dict):  # torch's @record format
        message = message.get("message", "")
    lines = str(message or "").strip().splitlines()
    return lines[-1] if lines else "no error message"


# a rank that ended within this long of its last heartbeat died at work (killed, crashed): it
# did not hang, even if it happened to be a phase behind its peers. A hung rank ends at least
# train.dist_timeout_s after its last heartbeat (torchrun's failure times are whole seconds).
_DIED_AT_WORK_S = 2.0

# a rank whose peer died fails too, with a message about the peer or the connection
_PEER_WORDS = ("peer", "remote", "connection", "broken pipe", "gloo", "nccl", "timed out",
               "timeout")


def _blame(failure: Failure) -> tuple[int, float]:
    """Sort key of the likely cause: a rank killed by a signal other than the agent's SIGTERM
    (SIGKILL, a segfault, the OOM killer) first, then a rank with its own error, then those
    that failed on their peers; earliest first within each."""
    if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM:
        rank = 0
    elif failure.exitcode < 0:  # stopped by its agent: never the cause
        rank = 3
    else:
        rank = 2 if any(w in failure.why.lower() for w in _PEER_WORDS) else 1
    return rank, failure.timestamp


def _stuck(failures: dict[int, Failure], heartbeats: dict[int, dict]
           ) -> tuple[int, str] | None:
    """(rank, line) for the rank that stopped making progress, from the ranks' heartbeats, when
    others failed waiting on a peer (a timeout, a closed connection): the agent then kills the
    stuck rank, which alone would look like any SIGKILL."""
    from ..run.heartbeat import furthest_behind

    if not any(_blame(f)[0] == 2 for f in failures.values()):
        return None  # nobody failed waiting on a peer: the failures speak for themselves
    found = furthest_behind(heartbeats)
    if found is None:
        return None
    rank, record = found
    ahead = max(r["time"] for r in heartbeats.values())
    end = failures.get(rank)
    if end is not None and end.timestamp - record["time"] < _DIED_AT_WORK_S:
        return None
    how = f"; it then ended with exit code {end.exitcode}: {end.why}" if end else ""
    where = f" on {record['host']}" if record.get("host") and end is None else ""
    return rank, (f"rank {rank}{where} stopped making progress at step {record['step']} (in "
                  f"its {record['phase']} phase, {ahead - record['time']:.0f} s before the "
                  f"furthest rank's last step); the others failed waiting for it{how}")


def describe_failure(exc, heartbeats: dict[int, dict] | None = None,
                     elsewhere: list[Failure] = ()) -> str:
    """The rank that failed first and why, then the ranks stopped because of it.

    `exc` is torchrun's ChildFailedError; `elsewhere`, the failures other nodes' launchers
    reported. Once a rank fails, the others fail on it (a closed connection) or are stopped by
    their agent (SIGTERM), and may even report first: the cause is the rank `_blame` puts
    first, on whichever node it ran.
    """
    failures = {**{f.rank: f for f in elsewhere},
                **{rank: Failure.of(rank, f) for rank, f in exc.failures.items()}}
    first = min(failures.values(), key=_blame)
    first_rank = first.rank
    lines = [f"{first.name()} failed first, with exit code {first.exitcode}: {first.why}"]
    stuck = _stuck(failures, heartbeats or {})
    # a rank killed from outside is the cause wherever it stood; a hung rank is killed by the
    # agent only after the others failed: then it is also the one furthest behind
    if stuck is not None and (stuck[0] == first_rank or _blame(first)[0] > 0):
        first_rank, line = stuck
        lines = [line]
    others = [f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(failures.items())
              if rank != first_rank]
    if others:
        lines.append(f"stopped after it: {', '.join(others)}")
    lines.append("each rank's own output is above" + (" (and in the other nodes' logs)"
                                                       if elsewhere else ""))
    return "\n".join(lines)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "node[03-05,9],gpu1" -> "node03"."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else \
        nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head.strip()
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def cluster_settings(env: dict[str, str]) -> tuple[str, dict[str, object]]:
    """(where from, launch settings) a cluster's scheduler gives this node: a Kubeflow
    PyTorchJob's PET_* variables, or a SLURM job's (srun, one launch per node); ("", {})
    elsewhere. Flags given on the command line win over them."""
    if "PET_NNODES" in env:
        found = {"nnodes": env["PET_NNODES"], "node_rank": env.get("PET_NODE_RANK"),
                 "master_addr": env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR"),
                 "master_port": env.get("PET_MASTER_PORT") or env.get("MASTER_PORT"),
                 "rdzv_endpoint": env.get("PET_RDZV_ENDPOINT"),
                 "rdzv_id": env.get("PET_RDZV_ID")}
        return "a PyTorchJob (PET_*)", {k: v for k, v in found.items() if v is not None}
    if "SLURM_JOB_ID" in env and "SLURM_NODEID" in env and "SLURM_JOB_NODELIST" in env:
        found = {"nnodes": env.get("SLURM_NNODES", "1"), "node_rank": env["SLURM_NODEID"],
                 "master_addr": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
                 "master_port": env.get("MASTER_PORT", "29500"),
                 "rdzv_id": env["SLURM_JOB_ID"]}
        return f"SLURM job {env['SLURM_JOB_ID']}", found
    return "", {}


def _settings(args: argparse.Namespace) -> None:
    """Fill the flags the user left out from the cluster's variables, then the defaults."""
    where, found = cluster_settings(dict(os.environ))
    for key, default in (("nnodes", "1"), ("node_rank", 0), ("master_addr", None),
                         ("master_port", None), ("rdzv_endpoint", None),
                         ("rdzv_id", "leantrain")):
        if getattr(args, key) is None:
            value = found.get(key, default)
            if key in ("node_rank", "master_port") and value is not None:
                try:
                    value = int(value)
                except ValueError as exc:
                    raise LeantrainError(f"{where}: {key} {value!r} is not a number") from exc
            setattr(args, key, value)
    if where:
        common.log.info("launch: %s: node %s of %s, %s", where, args.node_rank, args.nnodes,
                        f"rendezvous {args.rdzv_endpoint}" if args.rdzv_endpoint else
                        f"master {args.master_addr}:{args.master_port}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "launch", help="run `train` on several processes (torchrun: DDP or FSDP2)",
        description="Start N processes per node with torchrun, each running the leantrain "
                    "command after `--`. The plan picks DDP (default) or FSDP2 "
                    "(--set plan.distributed=fsdp). If any rank fails, the job stops and "
                    "exits non-zero, naming the rank.",
        epilog="examples:\n  leantrain launch --nproc 2 -- train --epochs 3\n"
               "  # two nodes, run on each with its --node-rank:\n"
               "  leantrain launch --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 "
               "--master-port 29500 -- train --out runs/big",
        formatter_class=common.RAW)
    p.add_argument("--nproc", type=int, required=True, metavar="N",
                   help="processes per node (one per GPU on GPU machines)")
    p.add_argument("--nnodes", metavar="M|MIN:MAX",
                   help="nodes (MIN:MAX: elastic, with --rdzv-endpoint); default 1, or what "
                        "SLURM (SLURM_NNODES) or a PyTorchJob (PET_NNODES) says")
    p.add_argument("--node-rank", type=int, metavar="R")
    p.add_argument("--master-addr", metavar="A", help="address of node 0")
    p.add_argument("--master-port", type=int, metavar="P")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="a c10d rendezvous instead of --master-addr/--node-rank: nodes join "
                        "in any order and get their ranks on arrival")
    p.add_argument("--rdzv-id", metavar="ID",
                   help="the job's id at the rendezvous (default leantrain)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="restart the job up to N times when a rank fails; each restart "
                        "continues from the run's last checkpoint (train --resume auto)")
    p.add_argument("launched", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="-- then the leantrain command to run, e.g. -- train --epochs 3")


def run(args: argparse.Namespace, dist) -> int:
    command = args.launched[1:] if args.launched[:1] == ["--"] else args.launched
    _settings(args)
    check_layout(command, args.nproc, args.nnodes)
    command = with_run_folder(command, args.nnodes)
    return launch(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                  command, args.max_restarts, args.rdzv_endpoint, args.rdzv_id)


def check_layout(command: list[str], nproc: int, nnodes: int | str) -> None:
    """A train command's parallel layout checked against the job's processes before any is
    started (`run.plan.layout`): tp x pp not dividing them, a hybrid layout that does not
    multiply to them, sequence parallel without tp... one line here, where each rank would
    have said it in a few lines after starting. A command this cannot read, or an elastic
    number of nodes, is left to the ranks."""
    if command[:1] != ["train"] or not str(nnodes).isdigit():
        return
    import contextlib
    import io

    from ..distributed import DistContext
    from ..run.plan import layout
    from . import train
    from .common import config_from_args

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="command"))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(command)
    except SystemExit:  # (the ranks' own parser says what is wrong with it)
        return
    cfg = config_from_args(args)
    layout(cfg.plan, DistContext(0, 0, nproc * int(nnodes), True))


def _option(command: list[str], flag: str) -> str | None:
    """The value of `flag` in the train command (`--out DIR` or `--out=DIR`), None if absent."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def run_folder(command: list[str]) -> Path | None:
    """The train command's run folder (--out, or the folder --resume continues)."""
    resume = _option(command, "--resume")
    found = _option(command, "--out") or (resume if resume != "auto" else None)
    return Path(found) if found else None


def _resume_command(nproc: int, nnodes: int | str, node_rank: int, master_addr: str | None,
                    master_port: int | None, command: list[str]) -> str:
    """The same launch continuing the stopped run: `train --resume` on its `--out` folder."""
    out = run_folder(command) or "DIR"
    nodes = f" --nnodes {nnodes} --node-rank {node_rank} --master-addr {master_addr} " \
            f"--master-port {master_port}" if str(nnodes) != "1" else ""
    return f"leantrain launch --nproc {nproc}{nodes} -- train --resume {out}"


def launch(nproc: int, nnodes: int | str, node_rank: int, master_addr: str | None,
           master_port: int | None, command: list[str], max_restarts: int = 0,
           rdzv_endpoint: str | None = None, rdzv_id: str = "leantrain") -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from ..run import heartbeat
    from ..run.signals import Stopped

    args = parse_args(torchrun_args(nproc, nnodes, node_rank, master_addr, master_port,
                                    command, max_restarts, rdzv_endpoint, rdzv_id))
    started = time.time()
    shared = _shared_notes(nnodes, command)
    beats = shared or Path(tempfile.mkdtemp(prefix="leantrain-heartbeats-"))
    os.environ[heartbeat.HEARTBEATS_ENV] = str(beats)  # the ranks inherit it
    where = rdzv_endpoint or f"{master_addr}:{master_port}"
    waiting = WaitingNote(str(nnodes), node_rank, where, shared) if str(nnodes) != "1" \
        else None
    try:
        run(args)
    except ChildFailedError as exc:
        elsewhere = _failures_elsewhere(exc, shared, started)
        report = describe_failure(exc, heartbeat.read(beats, started - 1), elsewhere)
        raise LeantrainError(f"the job failed:\n{report}") from exc
    except SignalException as exc:  # torchrun has passed the signal on to every rank
        name = signal.Signals(exc.sigval).name
        again = _resume_command(nproc, nnodes, node_rank, master_addr, master_port, command)
        raise Stopped(f"stopped by {name}: every rank was sent it; a training rank writes a "
                      f"checkpoint at the step it stops (continue with: {again})",
                      int(exc.sigval)) from exc
    finally:
        if waiting is not None:
            waiting.cancel()
        if shared is None:
            shutil.rmtree(beats, ignore_errors=True)
    return 0


def _shared_notes(nnodes: int | str, command: list[str]) -> Path | None:
    """Where a multi-node job's launchers keep their notes (`run.heartbeat`): the run folder's
    `.launch`, which every node sees; None on one node, or without --out (each launcher
    then knows only its own ranks)."""
    from ..run.heartbeat import LAUNCH_NAME

    folder = run_folder(command)
    if str(nnodes) == "1" or folder is None:
        return None
    try:
        (folder / LAUNCH_NAME).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LeantrainError(f"cannot write the run folder {folder}: {one_line(exc)}") from exc
    return folder / LAUNCH_NAME


ELSEWHERE_WAIT_S = 10.0  # how long a node whose ranks failed on a peer waits for its report


def _failures_elsewhere(exc, shared: Path | None, started: float) -> list[Failure]:
    """Report this node's failed ranks to the other launchers; when none of them is a cause
    (each failed on a peer, or was stopped), read the other nodes' reports, waiting up to
    ELSEWHERE_WAIT_S for one that names a cause: the node where a rank was killed sees it
    first, but may write after this one."""
    from ..run import heartbeat

    if shared is None:
        return []
    mine = [Failure.of(rank, f) for rank, f in exc.failures.items()]
    me = heartbeat.host()
    heartbeat.report_failures(shared, [{**vars(f), "host": me} for f in mine])
    if any(_blame(f)[0] < 2 for f in mine):
        return []  # the cause is here
    deadline = time.monotonic() + ELSEWHERE_WAIT_S
    while True:
        found = [Failure(**record) for record in heartbeat.others_failures(shared, started - 1)
                 if set(record) == set(Failure.__dataclass_fields__)]
        if any(_blame(f)[0] < 2 for f in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


WAIT_NOTE_S = 5.0  # a rendezvous still waiting this long says what for, then every minute


class WaitingNote:
    """While the nodes meet, a line now and then saying what this node waits for and, where the
    run folder holds the launchers' notes, how many nodes have arrived: a missing node once left
    node 0 waiting without a word until it was killed 150 s later. Silent as soon as this
    node's ranks run (the rendezvous is complete)."""

    def __init__(self, nodes: str, node_rank: int, where: str, shared: Path | None = None):
        import threading

        self.nodes, self.node_rank, self.where, self.shared = nodes, node_rank, where, shared
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._note, daemon=True)
        self.thread.start()

    def text(self) -> str:
        from ..run.heartbeat import arrived

        here = f": {arrived(self.shared)} arrived" if self.shared is not None else ""
        return (f"leantrain: launch: waiting at {self.where} for the job's {self.nodes} "
                f"nodes{here} (this is node {self.node_rank}); every node runs this launch "
                "with its own --node-rank (or the same --rdzv-endpoint)")

    def _note(self) -> None:
        import sys

        import psutil

        from ..run import heartbeat

        next_note = time.monotonic() + WAIT_NOTE_S
        try:
            while True:
                if self.shared is not None:
                    heartbeat.mark_arrived(self.shared)
                if self.done.wait(REFRESH_S) or psutil.Process().children(recursive=True):
                    return  # the ranks were started: the nodes have met
                if time.monotonic() >= next_note:
                    print(self.text(), file=sys.stderr, flush=True)
                    next_note = time.monotonic() + 60.0
        finally:
            if self.shared is not None:
                heartbeat.leave(self.shared)

    def cancel(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)


REFRESH_S = 1.0  # a waiting node's mark is refreshed this often (heartbeat.ARRIVED_FRESH_S)
