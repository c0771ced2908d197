"""One process vs `leantrain launch --nproc 2` (DDP over gloo) on this machine's CPU.

Both train the digits-cnn recipe for the same epochs with the same global batch (64 = 1 x 64
or 2 x 32) and the default plan. torchrun gives each of its processes one compute thread
(OMP_NUM_THREADS=1); the single process uses torch's default (all cores). Repeats alternate
the two; figures are medians of the runs' own summaries (global samples/s over training
steps) and of each command's wall time (start-up included).

    python benchmarks/distributed.py [--repeats 3] [--epochs 4]
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

from leantrain.env import cpu_model

RESULTS = Path(__file__).parent / "results"


def run(arm: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = ["train", "--epochs", str(epochs), "--no-progress", "--out", str(out),
                 "--set", "train.monitor_interval_s=0"]
        if arm == "1 process":
            cmd = [sys.executable, "-m", "leantrain", *train, "--set", "data.batch_size=64"]
        else:
            cmd = [sys.executable, "-m", "leantrain", "launch", "--nproc", "2", "--", *train,
                   "--set", "data.batch_size=32"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    return {"global_samples_per_second": summary["global_samples_per_second"],
            "train_seconds": summary["train_seconds"], "command_seconds": wall,
            "val_accuracy": summary["val_accuracy"], "world_size": summary["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    arms = ["1 process", "2 processes (DDP)"]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(args.repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            runs[arm].append(run(arm, args.epochs))
            last = runs[arm][-1]
            print(f"repeat {r} {arm}: {last['global_samples_per_second']:,.0f} samples/s, "
                  f"{last['command_seconds']:.1f} s command, accuracy "
                  f"{last['val_accuracy']:.2%}", flush=True)
    keys = ("global_samples_per_second", "train_seconds", "command_seconds", "val_accuracy")
    median = {arm: {k: statistics.median(x[k] for x in runs[arm]) for k in keys}
              for arm in arms}
    result = {
        "machine": {"cpu": cpu_model(), "cores": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "epochs": args.epochs, "repeats": args.repeats, "median": median,
        "speedup_samples_per_second": (median[arms[1]]["global_samples_per_second"]
                                       / median[arms[0]]["global_samples_per_second"]),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2))
    print(f"median global samples/s: 1 process {median[arms[0]]['global_samples_per_second']:,.0f}"
          f", 2 processes {median[arms[1]]['global_samples_per_second']:,.0f} -> "
          f"{result['speedup_samples_per_second']:.2f}x")


if __name__ == "__main__":
    main()
