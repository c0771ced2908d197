"""Does `leantrain bench --budget-s B` end within B + 10%? Whole commands, three model types.

Each case runs `leantrain bench --budget-s B` as a user would (a fresh process; its start-up,
data loading and model builds are inside the wall time, measured from outside), on the digits
CNN recipe, the tiny BERT classifier example and the tiny GPT-2 causal LM example, `--repeats`
times each, interleaved. The figure per run is its wall time over the budget; the bound is 1.10.
With `--hogs N`, N processes spin on the cores beside the whole run, as neighbours' jobs do (4 on
2 cores: a load about 6, what the issue saw). The machine's load is read around every run: the
share of the cores' time others used, and the load average.

    python benchmarks/bench_budget.py [--budget-s 60] [--repeats 2] [--hogs 4]
    python benchmarks/bench_budget.py --quick   # a 10 s budget, once each: checks that it runs
"""

from __future__ import annotations

import argparse
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

from leantrain.env import cpu_model
from leantrain.measure.load import LoadWatch

RESULTS = Path(__file__).parent / "results" / "bench_budget.json"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BOUND = 1.10
CASES = {
    "digits-cnn": [],
    "bert-classifier": ["--model", "hf_sequence_classification:model",
                        "--data", "hf_sequence_classification:data",
                        "--set", "optim.name=adamw", "--set", "optim.lr=1e-3"],
    "gpt2-causal-lm": ["--model", "hf_causal_lm:model", "--data", "hf_causal_lm:data",
                       "--set", "optim.name=adamw", "--set", "optim.lr=1e-3"],
}


@contextmanager
def hogs(count: int):
    """`count` processes spinning on the cores while the block runs (started through a shell
    that exits, so they are no one's children: a load reading counts children as its own)."""
    spin = f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"
    pids = [int(subprocess.run(["sh", "-c", spin], capture_output=True, text=True,
                               check=True).stdout) for _ in range(count)]
    try:
        if pids:
            time.sleep(1.0)  # let them take the cores
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def run(case: str, budget_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp, LoadWatch() as watch:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "leantrain.cli", "bench", *CASES[case],
                               "--budget-s", str(budget_s), "--out", f"{tmp}/bench",
                               "--no-progress"], cwd=EXAMPLES, capture_output=True, text=True,
                              env={**os.environ, "LEANTRAIN_CACHE": tmp})
        wall = time.perf_counter() - start
        report = json.loads((Path(tmp) / "bench" / "bench.json").read_text()) \
            if done.returncode == 0 else None
    if done.returncode != 0:
        raise SystemExit(f"{case}: bench failed: {done.stderr.strip().splitlines()[-1:]}")
    trials = report["trials"]
    return {"case": case, "wall_s": wall, "over_budget": wall / budget_s,
            "within_bound": wall <= BOUND * budget_s, "load": watch.reading.to_dict(),
            "load_average_1min": os.getloadavg()[0], "elapsed_in_bench_json": report["elapsed_s"],
            "log": done.stderr.strip().splitlines(),
            "measured": [t["name"] for t in trials if t["status"] == "ok"],
            "not_measured": {t["name"]: f"{t['status']}: {t['reason']}" for t in trials
                             if t["status"] != "ok"}}


def arguments(description: str, quick_budget_s: float) -> argparse.Namespace:
    """--budget-s, --repeats, --hogs and --quick (a short budget, once: checks that it runs)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=0, help="processes spinning beside")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.budget_s, args.repeats = quick_budget_s, 1
    return args


def budget_arguments(description: str, quick_budget_s: float) -> tuple[float, int, bool]:
    """(budget, repeats, quick) from the command line."""
    args = arguments(description, quick_budget_s)
    return args.budget_s, args.repeats, args.quick


def main() -> None:
    args = arguments(__doc__.splitlines()[0], 10.0)
    budget, quick = args.budget_s, args.quick
    runs = []
    with hogs(args.hogs):
        for r in range(args.repeats):
            for case in CASES:
                found = {**run(case, budget), "repeat": r}
                runs.append(found)
                print(f"{case:16s} {found['wall_s']:6.1f} s of a {budget:.0f} s budget "
                      f"({found['over_budget']:.2f}x, load {found['load_average_1min']:.1f})"
                      f"{'  BUSY' if found['load']['busy'] else ''}", flush=True)
    worst = max(f["over_budget"] for f in runs)
    record = {"machine": {"cpu": cpu_model(), "arch": platform.machine(),
                          "torch": torch.__version__, "cores": os.cpu_count()},
              "budget_s": budget, "bound": BOUND, "hogs": args.hogs,
              "runs": runs, "worst_over_budget": worst,
              "all_within_bound": all(f["within_bound"] for f in runs)}
    print(f"worst: {worst:.2f}x the budget; all within {BOUND:.2f}x: "
          f"{record['all_within_bound']}")
    if not quick:
        RESULTS.with_name(f"{RESULTS.stem}{'_busy' if args.hogs else ''}.json").write_text(
            json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
