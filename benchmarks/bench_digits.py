"""`leantrain bench --budget-s 180` on digits-cnn, then time-to-97% with its winning plan.

1. Runs the bench command as a user would (its whole wall time, start-up included, is timed:
   the acceptance is <= 3.5 minutes).
2. Trains to 97% validation accuracy with the bench's baseline plan (`baseline.yaml`: plain
   fp32 eager loop, per-sample DataLoader) and with its winning plan (`plan.yaml`), through
   `leantrain train --plan ... --target-acc 0.97`, alternating the two `--repeats` times so that
   machine noise hits both alike. Time to target is the trainer's own clock (training loop and
   evaluations, not process start-up); the ratio is of medians.

    python benchmarks/bench_digits.py [--budget-s 180] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def leantrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leantrain", *args], capture_output=True,
                          text=True, check=True)


def time_to_target(plan: Path, target: float, out: Path) -> dict:
    leantrain("train", "--plan", str(plan), "--target-acc", str(target), "--out", str(out),
              "--no-progress")
    summary = json.loads((out / "summary.json").read_text())
    return {k: summary[k] for k in ("time_to_target_seconds", "val_accuracy", "epochs", "steps",
                                    "samples_per_second")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=180)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.97)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_dir = Path(tmp) / "bench"
        start = time.perf_counter()
        leantrain("bench", "--budget-s", str(args.budget_s), "--out", str(bench_dir),
                  "--no-progress")
        bench_wall = time.perf_counter() - start
        bench = json.loads((bench_dir / "bench.json").read_text())
        plans = {name: (bench_dir / f"{name}.yaml").read_text() for name in ("baseline", "plan")}
        runs: dict[str, list[dict]] = {"baseline": [], "plan": []}
        for i in range(args.repeats):
            for name in ("baseline", "plan"):
                runs[name].append(time_to_target(bench_dir / f"{name}.yaml", args.target,
                                                 Path(tmp) / f"{name}-{i}"))
                print(name, runs[name][-1], flush=True)
        bench_png = (bench_dir / "bench.png").read_bytes()
    medians = {name: statistics.median(r["time_to_target_seconds"] or float("inf")
                                       for r in rs) for name, rs in runs.items()}
    winner = next(t for t in bench["trials"] if t["name"] == bench["winner"])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "bench": {"budget_s": args.budget_s, "wall_seconds": bench_wall,
                  "trials": len(bench["trials"]), "winner": bench["winner"],
                  "winner_samples_per_second_speedup": winner["speedup"]},
        "plans": plans,
        "target": args.target,
        "time_to_target": runs,
        "median_seconds": medians,
        "speedup_time_to_target": medians["baseline"] / medians["plan"],
        "bench_json": bench,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_digits.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "bench_digits.png").write_bytes(bench_png)
    print(f"bench: {bench_wall:.0f} s wall (budget {args.budget_s:.0f} s), winner "
          f"{bench['winner']}")
    print(f"time to {args.target:.0%}: baseline {medians['baseline']:.2f} s, winning plan "
          f"{medians['plan']:.2f} s -> {result['speedup_time_to_target']:.2f}x")


if __name__ == "__main__":
    main()
