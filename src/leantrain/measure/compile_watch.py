"""What torch.compile did while a run trained: graphs compiled, recompiles and why, graph breaks.

A recompile is a guard failure (a new shape, dtype or Python value the compiled graph did not
cover); each costs a compile and, past torch's recompile limit, the function falls back to
eager. A graph break splits a forward into several graphs with Python in between. Both are the
usual reasons compiling does not pay, so train, bench and doctor report them, read from
Dynamo's own counters (compared with a snapshot taken at the start) and from its "recompiles"
log, which names the failing guard.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"  # torch's "recompiles" log artifact
# Dynamo counts graph breaks under "graph_break"; some (data-dependent branching) it counts as
# "unimplemented" constructs, after which it also resumes in a new graph
_BREAK_COUNTERS = ("graph_break", "unimplemented")


@dataclass
class CompileStats:
    graphs: int  # graphs compiled (recompiles and graph-break pieces included)
    recompiles: int | None  # None: not counted (TORCH_LOGS was set; torch's settings won)
    recompile_reasons: list[str] = field(default_factory=list)  # first failing guard of each
    graph_breaks: dict[str, int] = field(default_factory=dict)  # reason -> times met

    def to_dict(self) -> dict:
        return asdict(self)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else text


def _reason(message: str) -> str:
    """"tensor 'x' size mismatch at index 0. expected 4, actual 5" from a recompile message."""
    failures = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    reason = failures[0] if failures else _first_line(message)
    head, sep, rest = reason.partition(": ")  # drop the "0/1" compile id
    return rest if sep and "/" in head and head.replace("/", "").isdigit() else reason


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(_reason(record.getMessage()))


class CompileWatch:
    """Counts what torch.compile does between `start()` and `stop()`.

    Recompile reasons come from torch's "recompiles" log, switched on for the watch (and its
    messages kept from the terminal); when the user set TORCH_LOGS, torch's settings win and
    recompiles are not counted (a frame counter cannot tell them from graph-break pieces).
    """

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._handler: _Collect | None = None
        self._before: dict[str, Counter] = {}
        self._logging_switched = False

    @staticmethod
    def _counters() -> dict[str, Counter]:
        from torch._dynamo.utils import counters
        return {k: Counter(counters[k]) for k in ("stats", *_BREAK_COUNTERS)}

    def start(self) -> CompileWatch:
        import os

        import torch
        self._before = self._counters()
        self._logging_switched = "TORCH_LOGS" not in os.environ
        if self._logging_switched:
            torch._logging.set_logs(recompiles=True)
            logger = logging.getLogger(RECOMPILES_LOGGER)
            self._handler = _Collect(self.reasons)
            logger.addHandler(self._handler)
            logger.propagate = False  # into the summary, not onto the terminal
        return self

    @property
    def recompiles(self) -> int:
        return len(self.reasons)

    def stats(self) -> CompileStats:
        now, before = self._counters(), self._before
        graphs = now["stats"]["unique_graphs"] - before.get("stats", Counter())["unique_graphs"]
        breaks: Counter = Counter()
        for key in _BREAK_COUNTERS:
            for reason, n in (now[key] - before.get(key, Counter())).items():
                breaks[_first_line(reason)] += n
        recompiles = len(self.reasons) if self._logging_switched else None
        return CompileStats(graphs, recompiles, list(self.reasons), dict(breaks))

    def stop(self) -> CompileStats:
        found = self.stats()
        if self._handler is not None:
            import torch
            logger = logging.getLogger(RECOMPILES_LOGGER)
            logger.removeHandler(self._handler)
            logger.propagate = True
            torch._logging.set_logs()  # torch's defaults again
            self._handler = None
        return found


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def break_even_steps(compile_seconds: float, eager_step_s: float, compiled_step_s: float
                     ) -> int | None:
    """Optimizer steps after which compiling has paid for its compile time; None: never
    (compiled steps are not faster)."""
    saved = eager_step_s - compiled_step_s
    if saved <= 0:
        return None
    return math.ceil(max(compile_seconds, 0.0) / saved)


def describe(found: dict) -> str:
    """"3 graphs, 1 recompile (most often: ...), 2 graph breaks (...)" from `CompileStats`'s
    dict (as summaries and bench results keep it)."""
    graphs, recompiles, breaks = found["graphs"], found["recompiles"], found["graph_breaks"]
    parts = [f"{graphs} graph{'s' * (graphs != 1)}",
             "recompiles not counted (TORCH_LOGS is set)" if recompiles is None else
             f"{recompiles} recompile{'s' * (recompiles != 1)}"]
    if found["recompile_reasons"]:
        common = Counter(found["recompile_reasons"]).most_common(1)[0][0]
        parts[-1] += f" (most often: {common})"
    n_breaks = sum(breaks.values())
    parts.append(f"{n_breaks} graph break{'s' * (n_breaks != 1)}")
    if breaks:
        parts[-1] += f" ({'; '.join(list(breaks)[:2])})"
    return ", ".join(parts)
