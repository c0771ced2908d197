"""`leantrain tune` on the digits CNN: a time-to-97% study within its budget, then its best
config against the default recipe and the seed documents' plain loop.

1. `leantrain tune --objective time-to-target --target val_accuracy>=0.97 --budget-s B`, run
   as a whole process and timed: it should end within 10% of B.
2. In --pairs interleaved rounds (order rotated), to the first evaluation at >= 97%:
   the plain loop (`train_vs_plain.plain_loop`, timed in-process from its loop's start, and
   again as a whole process), `leantrain train --target-acc 0.97` (the default recipe) and
   `leantrain train --config best.yaml --target-acc 0.97`, each a whole process; training time
   is the run's `time_to_target_seconds` (loop start to the evaluation that met it, as the
   plain loop is timed). Ratios are paired per round, with a bootstrap 95% interval.

    python benchmarks/tune_digits.py [--budget-s 420] [--pairs 3]   # ~11 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from train_vs_plain import plain_loop  # noqa: E402

from leantrain.env import cpu_model  # noqa: E402
from leantrain.measure.rounds import interval  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET = 0.97
LEANTRAIN = [sys.executable, "-m", "leantrain"]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def train_run(extra: list[str], out: Path, seed: int) -> dict:
    seconds = timed([*LEANTRAIN, "train", "--target-acc", str(TARGET), "--set",
                     f"train.seed={seed}", "--out", str(out), "--no-progress", *extra])
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["time_to_target_seconds"], "epochs": summary["epochs"],
            "val_accuracy": summary["val_accuracy"], "command_seconds": seconds}


def plain_process(seed: int) -> dict:
    """The plain loop as a whole process: interpreter, imports and data included."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--plain-once", str(seed)], check=True,
                          capture_output=True, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "command_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--plain-once", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_once is not None:
        print(json.dumps(plain_loop(args.plain_once, TARGET)))
        return
    work = Path(tempfile.mkdtemp(prefix="tune_digits-"))
    tune_out = work / "tune"
    tune_seconds = timed([*LEANTRAIN, "tune", "--objective", "time-to-target", "--target",
                          f"val_accuracy>={TARGET}", "--budget-s", str(args.budget_s),
                          "--out", str(tune_out), "--no-progress"])
    report = json.loads((tune_out / "tune.json").read_text())
    best = yaml.safe_load((tune_out / "best.yaml").read_text())
    print(f"tune: {tune_seconds:.0f} s for a {args.budget_s:.0f} s budget; trials "
          f"{report['counts']}; best trial {report['best']}", flush=True)
    runs: dict[str, list[dict]] = {"plain": [], "plain_process": [], "default": [], "tuned": []}
    names = list(runs)
    for pair in range(args.pairs):
        order = names[pair % len(names):] + names[:pair % len(names)]
        for name in order:
            out = work / f"{name}-{pair}"
            if name == "plain":
                runs[name].append(plain_loop(pair, TARGET))
            elif name == "plain_process":
                runs[name].append(plain_process(pair))
            elif name == "default":
                runs[name].append(train_run([], out, pair))
            else:
                runs[name].append(train_run(["--config", str(tune_out / "best.yaml")], out,
                                            pair))
        print(f"pair {pair}: " + ", ".join(f"{k} {v[-1]['seconds']} s / {v[-1]['epochs']} "
                                           "epochs" for k, v in runs.items()), flush=True)

    def ratios(numerator: str, denominator: str, key: str) -> dict:
        # a run that missed the target within its epochs has no time: its pair is left out
        values = [a[key] / b[key] for a, b in zip(runs[numerator], runs[denominator],
                                                  strict=True) if a[key] and b[key]]
        return {"values": values, "median": statistics.median(values) if values else None,
                "bootstrap95": interval(values), "pairs_missing": args.pairs - len(values)}

    result = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"), "target": TARGET, "pairs": args.pairs,
        "tune": {"budget_s": args.budget_s, "process_seconds": tune_seconds,
                 "over_budget_fraction": tune_seconds / args.budget_s - 1,
                 "counts": report["counts"], "pruning": report["pruning"],
                 "best_trial": report["best"],
                 "best_params": next(t["params"] for t in report["trials"]
                                     if t["number"] == report["best"][0])},
        "best_config": {k: best[k] for k in ("optim", "schedule", "data", "train")},
        "runs": runs,
        "training_time_speedup": {
            "tuned_vs_plain": ratios("plain", "tuned", "seconds"),
            "tuned_vs_default": ratios("default", "tuned", "seconds")},
        "whole_process_speedup": {
            "tuned_vs_plain": ratios("plain_process", "tuned", "command_seconds"),
            "tuned_vs_default": ratios("default", "tuned", "command_seconds")},
        "epochs_median": {k: statistics.median(r["epochs"] for r in v)
                          for k, v in runs.items()},
        "missed_target": {k: sum(r["seconds"] is None for r in v) for k, v in runs.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_digits.json").write_text(json.dumps(result, indent=2) + "\n")
    for kind in ("training_time_speedup", "whole_process_speedup"):
        for name, found in result[kind].items():
            print(f"{kind} {name}: {found['median']}x (95% {found['bootstrap95']}, "
                  f"{found['pairs_missing']} pairs missing)")
    print(f"epochs to {TARGET:.0%} (median): {result['epochs_median']}")


if __name__ == "__main__":
    main()
