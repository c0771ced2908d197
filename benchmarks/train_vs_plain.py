"""Time-to-97% validation accuracy: the seed documents' plain loop vs `leantrain train`.

Both train the same model (the digits-cnn recipe's SmallCNN) on the same data (digits, 32×32,
fixed 80/20 split), and both are timed from the start of the training loop to the first
evaluation at or above the target, evaluation included; process start-up and data loading are
excluded from both (the leantrain command's whole wall time is recorded too). Repeats
alternate the two so that machine noise hits both alike; the ratio is of medians.

`--whole-process` times what a user's stopwatch sees instead: each a fresh process, from its
start (interpreter, imports, data) to its exit at the target, the plain loop run by this file
(`--plain-process`), leantrain as `leantrain train --target-acc` with a fresh plan cache
(issue 44: >= 2.5x, median of 3); `results/train_vs_plain_whole_process.json`.

    python benchmarks/train_vs_plain.py [--repeats 5] [--target 0.97]
    python benchmarks/train_vs_plain.py --whole-process [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import bootstrap
from torch.utils.data import DataLoader

from leantrain.config import DataConfig
from leantrain.data import load_data
from leantrain.env import cpu_model
from leantrain.recipes.models import SmallCNN

RESULTS = Path(__file__).parent / "results"


def plain_loop(seed: int, target: float, max_epochs: int = 40) -> dict:
    """The loop of the seed documents: DataLoader over a TensorDataset, fp32, NCHW, SGD."""
    bundle = load_data(DataConfig())
    torch.manual_seed(seed)
    model = SmallCNN(1, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(bundle.train, batch_size=64, shuffle=True)
    xv, yv = bundle.val.tensors
    start = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        for data, labels in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), labels)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        if acc >= target:
            return {"seconds": time.perf_counter() - start, "epochs": epoch, "val_accuracy": acc}
    return {"seconds": None, "epochs": max_epochs, "val_accuracy": acc}


def leantrain_run(seed: int, target: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "leantrain", "train", "--target-acc", str(target),
                        "--set", f"train.seed={seed}", "--out", str(out), "--no-progress"],
                       check=True, capture_output=True)
        command_seconds = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["time_to_target_seconds"], "epochs": summary["epochs"],
            "val_accuracy": summary["val_accuracy"], "command_seconds": command_seconds,
            "plan": summary["plan"]["outcomes"]}


def whole_process(name: str, seed: int, target: float) -> dict:
    """One fresh process to the target, timed from its start to its exit."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--plain-process", str(seed), str(target),
                   str(Path(tmp) / "plain.json")] if name == "plain" else \
            [sys.executable, "-m", "leantrain", "train", "--target-acc", str(target), "--set",
             f"train.seed={seed}", "--out", str(Path(tmp) / "run"), "--no-progress"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True,
                       env={**os.environ, "LEANTRAIN_CACHE": str(Path(tmp) / "cache")})
        seconds = time.perf_counter() - start
        found = json.loads((Path(tmp) / "plain.json").read_text()) if name == "plain" else \
            json.loads((Path(tmp) / "run" / "summary.json").read_text())
    return {"seconds": seconds, "epochs": found["epochs"], "val_accuracy": found["val_accuracy"],
            "training_seconds": found.get("seconds", found.get("time_to_target_seconds"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--whole-process", action="store_true")
    parser.add_argument("--plain-process", nargs=3, metavar=("SEED", "TARGET", "OUT"))
    args = parser.parse_args()
    if args.plain_process:
        seed, target, out = args.plain_process
        Path(out).write_text(json.dumps(plain_loop(int(seed), float(target))))
        return
    runs = {"plain": [], "leantrain": []}
    for seed in range(args.repeats):  # pairs, alternating which loop goes first
        order = ("plain", "leantrain") if seed % 2 == 0 else ("leantrain", "plain")
        for name in order:
            if args.whole_process:
                runs[name].append(whole_process(name, seed, args.target))
            else:
                runs[name].append(plain_loop(seed, args.target) if name == "plain"
                                  else leantrain_run(seed, args.target))
        print(f"repeat {seed}: plain {runs['plain'][-1]['seconds']:.2f} s, "
              f"leantrain {runs['leantrain'][-1]['seconds']:.2f} s", flush=True)
    medians = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    ratios = [p["seconds"] / lt["seconds"] for p, lt in zip(runs["plain"], runs["leantrain"],
                                                           strict=True)]
    interval = bootstrap((ratios,), statistics.median, confidence_level=0.95,
                         random_state=0, method="percentile").confidence_interval
    result = {
        "timed": "whole process, start to exit" if args.whole_process else
                 "training loop to the target, evaluations included",
        "target_accuracy": args.target,
        "repeats": args.repeats,
        "machine": {"cpu": cpu_model(), "arch": platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "median_seconds": medians,
        "speedup": medians["plain"] / medians["leantrain"],
        "paired_ratios": ratios,
        "paired_ratio_median": statistics.median(ratios),
        "paired_ratio_95ci": [interval.low, interval.high],
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "train_vs_plain_whole_process.json" if args.whole_process else "train_vs_plain.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"median time to {args.target:.0%}: plain {medians['plain']:.2f} s, leantrain "
          f"{medians['leantrain']:.2f} s; paired ratio {result['paired_ratio_median']:.2f}x "
          f"(95% bootstrap interval {interval.low:.2f}-{interval.high:.2f}x) on {cpu_model()}")


if __name__ == "__main__":
    main()
