"""Which learning-rate schedule is the default: the one that never ends worse than constant.

Every case of benchmarks/plain_loop.py (a CNN with SGD, a regression MLP with Adam, and five
stock Hugging Face models with AdamW) is trained by the plain loop at the user's learning rate
and at 3x it, for a short run and one 3x as long, on several seeds, once per candidate:
leantrain's own `lr_multiplier` for each schedule (so the schedule measured is the schedule
shipped), and a constant rate with the digits recipe's weight decay (5e-4) to check that
setting too. Each cell (case, lr, length) compares a candidate's final validation loss with
the constant rate's on the same seed: the relative difference, its mean over seeds and a 95%
bootstrap interval of that mean. A candidate "ends worse beyond noise" in a cell when the whole
interval lies above zero. The verdict names the candidates worse in no cell and, among them, the
one with the lowest mean difference: the default (tests/test_learning_check.py checks that
config.ScheduleConfig's default is that verdict).

Final losses, not times, are compared: a busy machine slows this benchmark but does not change
its numbers (each run is seeded and deterministic on the CPU).

    python benchmarks/schedules.py [--seeds 3] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_loop import CASES, train_plain, val_loss  # noqa: E402

from leantrain.config import ScheduleConfig  # noqa: E402
from leantrain.env import cpu_model  # noqa: E402
from leantrain.techniques.schedules import lr_multiplier  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BASELINE = "constant"
# name -> (schedule, weight decay or None for torch's default)
CANDIDATES = {
    "constant": (ScheduleConfig(name="constant", warmup_fraction=0.0), None),
    "cosine": (ScheduleConfig(name="cosine", warmup_fraction=0.05), None),
    "wsd": (ScheduleConfig(name="wsd", warmup_fraction=0.05, decay_fraction=0.2), None),
    "wsd-no-warmup": (ScheduleConfig(name="wsd", warmup_fraction=0.0, decay_fraction=0.2), None),
    "onecycle": (ScheduleConfig(name="onecycle", warmup_fraction=0.25), None),
    "constant-wd-5e-4": (ScheduleConfig(name="constant", warmup_fraction=0.0), 5e-4),
}
LR_FACTORS = (1.0, 3.0)
LENGTHS = {"short": 1, "long": 3}  # multiples of the case's epochs


def one_run(job: tuple[str, float, str, int, str]) -> dict:
    """Train one (case, lr factor, length, seed, candidate) and return its final val loss."""
    torch.set_num_threads(1)  # two single-threaded workers beat one two-threaded on tiny models
    case_name, factor, length, seed, candidate = job
    schedule, weight_decay = CANDIDATES[candidate]
    case = replace(CASES[case_name], lr=CASES[case_name].lr * factor)
    start = time.perf_counter()
    model = train_plain(case, seed, case.epochs * LENGTHS[length],
                        lambda step, total: lr_multiplier(step, schedule, total, 1),
                        weight_decay)
    return {"case": case_name, "lr_factor": factor, "length": length, "seed": seed,
            "candidate": candidate, "val_loss": val_loss(case, model),
            "seconds": time.perf_counter() - start}


def _interval(values: list[float]) -> list[float]:
    if len(set(values)) == 1:
        return [values[0], values[0]]
    found = bootstrap((values,), np.mean, confidence_level=0.95, random_state=0,
                      method="percentile").confidence_interval
    return [float(found.low), float(found.high)]


RULE = ("a candidate is worse beyond noise in a cell when the 95% bootstrap interval of its "
        "mean seed-paired relative difference in final val loss vs constant lies above 0; the "
        "default is the schedule worse in no cell with the lowest mean difference (constant "
        "when none)")


def compare(runs: list[dict]) -> dict:
    """Per cell and candidate: relative difference of final val loss vs constant, seed-paired."""
    loss = {(r["case"], r["lr_factor"], r["length"], r["seed"], r["candidate"]): r["val_loss"]
            for r in runs}
    cells = sorted({k[:3] for k in loss})
    seeds = sorted({k[3] for k in loss})
    table = {}
    for candidate in CANDIDATES:
        if candidate == BASELINE:
            continue
        rows = []
        for cell in cells:
            diffs = [loss[(*cell, s, candidate)] / loss[(*cell, s, BASELINE)] - 1 for s in seeds]
            low, high = _interval(diffs)
            rows.append({"case": cell[0], "lr_factor": cell[1], "length": cell[2],
                         "val_loss": statistics.mean(loss[(*cell, s, candidate)] for s in seeds),
                         "constant_val_loss": statistics.mean(loss[(*cell, s, BASELINE)]
                                                              for s in seeds),
                         "mean_relative_difference": statistics.mean(diffs),
                         "interval_95": [low, high], "worse_beyond_noise": low > 0,
                         "better_beyond_noise": high < 0})
        means = [r["mean_relative_difference"] for r in rows]
        table[candidate] = {"cells": rows,
                            "cells_worse": sum(r["worse_beyond_noise"] for r in rows),
                            "cells_better": sum(r["better_beyond_noise"] for r in rows),
                            "mean_relative_difference": statistics.mean(means),
                            "worst_relative_difference": max(means)}
    schedules = [c for c in table if CANDIDATES[c][1] is None]  # the weight-decay arm is no
    never_worse = [c for c in schedules if table[c]["cells_worse"] == 0]  # schedule
    best = min(never_worse, key=lambda c: table[c]["mean_relative_difference"], default=BASELINE)
    return {"comparisons": table, "never_worse": never_worse, "default": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="two cases, one lr, short runs, 2 seeds (a smoke test)")
    parser.add_argument("--reanalyse", action="store_true",
                        help="recompute the verdict from the runs already in the results file")
    args = parser.parse_args()
    if args.reanalyse:
        saved = json.loads((RESULTS / "schedules.json").read_text())
        saved.update(compare(saved["runs"]), rule=RULE)
        (RESULTS / "schedules.json").write_text(json.dumps(saved, indent=2))
        return report(saved)
    cases = ["mlp-regression-adam", "llama-gqa-padded"] if args.quick else list(CASES)
    factors = (1.0,) if args.quick else LR_FACTORS
    lengths = ("short",) if args.quick else tuple(LENGTHS)
    seeds = range(2 if args.quick else args.seeds)
    jobs = [(c, f, n, s, k) for c in cases for f in factors for n in lengths for s in seeds
            for k in CANDIDATES]
    start = time.perf_counter()  # for the record only: no figure here is a time
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(one_run, jobs))
    verdict = compare(runs)
    result = {
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "torch": torch.__version__,
                    "workers": args.workers, "threads_per_worker": 1},
        "seconds": time.perf_counter() - start,
        "candidates": {k: {"schedule": vars(s), "weight_decay": wd or "torch default"}
                       for k, (s, wd) in CANDIDATES.items()},
        "rule": RULE,
        "lr_factors": list(factors), "lengths": {n: LENGTHS[n] for n in lengths},
        "cases": {c: {"optimizer": CASES[c].optimizer, "lr": CASES[c].lr,
                      "epochs": CASES[c].epochs, "batch_size": CASES[c].batch_size}
                  for c in cases},
        **verdict, "runs": runs,
    }
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "schedules.json").write_text(json.dumps(result, indent=2))
    report(result)


def report(result: dict) -> None:
    for name, t in result["comparisons"].items():
        print(f"{name:18s} mean {t['mean_relative_difference']:+.1%} vs constant, worst cell "
              f"{t['worst_relative_difference']:+.1%}, worse beyond noise in {t['cells_worse']}"
              f"/{len(t['cells'])} cells, better in {t['cells_better']}")
    print(f"default: {result['default']} (on {result['machine']['cpu']})")


if __name__ == "__main__":
    main()
