"""Are bench's numbers true on a busy machine? A real load generator beside it.

Part 1 runs `leantrain bench` on the tiny BERT classifier example (a fresh process each time)
with the machine quiet and with a CPU hog running beside it (one process spinning on one core,
as a neighbour's job does), alternating. For every candidate it records how far its speed-up
interval excludes 1 (0 when the interval contains 1). Bench passes when no candidate measured
busy excludes 1 by more than the same candidate did in any quiet run (plus `SLACK`), and
every busy run is flagged busy in its bench.json and printed table.

Part 2 times the same model's training step with torch's default threads and with one thread
per core the hog leaves free, in interleaved windows under the hog: the ratio (with its 95%
interval) is what the busy flag's advice rests on.

    python benchmarks/busy.py [--budget-s 60] [--repeats 2]
    python benchmarks/busy.py --quick   # 15 s budgets, one repeat: checks that it runs
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_budget import budget_arguments

from leantrain.env import cpu_model
from leantrain.measure.load import LoadWatch
from leantrain.measure.rounds import interval

RESULTS = Path(__file__).parent / "results" / "busy.json"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SLACK = 0.05  # an interval may exclude 1 by 5 points more busy than quiet before it counts
BERT = ["--model", "hf_sequence_classification:model", "--data",
        "hf_sequence_classification:data", "--set", "optim.name=adamw", "--set", "optim.lr=1e-3"]


@contextmanager
def hog(on: bool):
    """One process spinning on one core while the block runs (nothing when `on` is False).
    Started through a shell that exits, so it is not this process's child: a load reading
    counts children's time as its own, and a neighbour's job is no one's child."""
    pid = int(subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' "
                              ">/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                             check=True).stdout) if on else None
    try:
        if pid:
            time.sleep(1.0)  # let it take its core
        yield
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)


def excludes_one_by(found: list[float] | None) -> float:
    """How far a speed-up interval lies from 1 (0 when it contains 1 or is missing)."""
    if not found:
        return 0.0
    low, high = found
    return max(low - 1.0, 1.0 - high, 0.0)


def bench_once(busy: bool, budget_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, hog(busy), LoadWatch() as watch:
        done = subprocess.run([sys.executable, "-m", "leantrain.cli", "bench", *BERT,
                               "--budget-s", str(budget_s), "--keep-batch-size", "--out",
                               f"{tmp}/bench", "--no-progress"], cwd=EXAMPLES,
                              capture_output=True, text=True,
                              env={**os.environ, "LEANTRAIN_CACHE": tmp})
        if done.returncode != 0:
            raise SystemExit(f"bench failed: {done.stderr.strip().splitlines()[-1:]}")
        report = json.loads((Path(tmp) / "bench" / "bench.json").read_text())
    flagged_in_table = "machine BUSY" in done.stdout
    return {"busy": busy, "load_outside": watch.reading.to_dict(),
            "flagged_busy": bool(report["load"]["busy"]), "flagged_in_table": flagged_in_table,
            "trials": {t["name"]: {"speedup": t["speedup"],
                                   "interval": t["speedup_interval"],
                                   "excludes_one_by": excludes_one_by(t["speedup_interval"])}
                       for t in report["trials"] if t["status"] == "ok"},
            "winner": report["winner"]}


def step_rates(threads: int, seconds: float) -> float:
    """Samples/s of the tiny BERT's training step over `seconds`, with `threads` threads."""
    sys.path.insert(0, str(EXAMPLES))
    import hf_sequence_classification as example

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = example.model()
    train = example.data()[0]
    batch = example.pad([train[i] for i in range(32)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        samples += 32
    return samples / (time.perf_counter() - start)


def threads_under_hog(rounds: int, seconds: float) -> dict:
    default = torch.get_num_threads()
    free = max(1, (os.cpu_count() or 1) - 1)
    pairs = []
    with hog(True):
        step_rates(default, 1.0)  # warm-up: imports, allocator
        for _ in range(rounds):
            many, few = step_rates(default, seconds), step_rates(free, seconds)
            pairs.append({"default_threads": many, "free_core_threads": few})
    torch.set_num_threads(default)
    ratios = [p["free_core_threads"] / p["default_threads"] for p in pairs]
    found = interval(ratios)
    return {"default_threads": default, "free_core_threads": free, "rounds": pairs,
            "ratio_median": sorted(ratios)[len(ratios) // 2],
            "ratio_interval": list(found) if found else None}


def main() -> None:
    budget, repeats, quick = budget_arguments(__doc__.splitlines()[0], 15.0)
    runs = []
    for r in range(repeats):
        for busy in (False, True):
            found = {**bench_once(busy, budget), "repeat": r}
            runs.append(found)
            print(f"bench {'BUSY ' if busy else 'quiet'} flagged busy: {found['flagged_busy']}; "
                  + ", ".join(f"{n} {t['speedup']:.2f}x" for n, t in found["trials"].items()),
                  flush=True)
    quiet = [f for f in runs if not f["busy"]]
    worst_quiet = {}
    for f in quiet:
        for name, t in f["trials"].items():
            worst_quiet[name] = max(worst_quiet.get(name, 0.0), t["excludes_one_by"])
    beyond = [{"repeat": f["repeat"], "trial": name, "busy_excludes_one_by": t["excludes_one_by"],
               "quiet_worst": worst_quiet.get(name, 0.0)}
              for f in runs if f["busy"] for name, t in f["trials"].items()
              if t["excludes_one_by"] > worst_quiet.get(name, 0.0) + SLACK]
    threads = threads_under_hog(3 if quick else 8, 1.0 if quick else 3.0)
    print(f"under the hog: {threads['free_core_threads']} thread(s) ran at "
          f"{threads['ratio_median']:.2f}x the default {threads['default_threads']} "
          f"(95% {threads['ratio_interval']})")
    record = {"machine": {"cpu": cpu_model(), "arch": platform.machine(),
                          "cores": os.cpu_count(), "torch": torch.__version__},
              "budget_s": budget, "slack": SLACK, "runs": runs,
              "busy_runs_flagged": all(f["flagged_busy"] and f["flagged_in_table"]
                                       for f in runs if f["busy"]),
              "quiet_runs_not_flagged": not any(f["flagged_busy"] for f in quiet),
              "beyond_quiet": beyond, "threads_under_hog": threads}
    print(f"busy runs flagged: {record['busy_runs_flagged']}; quiet runs not flagged: "
          f"{record['quiet_runs_not_flagged']}; candidates beyond the quiet runs: {beyond}")
    if not quick:
        RESULTS.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
