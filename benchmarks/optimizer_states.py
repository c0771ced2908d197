"""Optimizer-state precision on the text-gpt recipe: memory saved, speed, loss-curve cost.

The recipe's default GPT (1.85 M parameters, AdamW) trained for --epochs on --max-bytes of the
standard library's sources, once per seed for each `plan.optimizer_states`: fp32 moments,
bf16 weights and moments (stochastic rounding), torchao's 8-bit and 4-bit moments; every run
under bf16 autocast so that only the states differ, in an order rotated per seed (machine
drift spreads over all of them). Per setting: the optimizer's state bytes (measured through
torchao's tensor subclasses after one step), training samples/s and held-out bits per byte;
per seed, the ratio and the difference to fp32 on the same seed, with a 95% bootstrap interval
over seeds.

    python benchmarks/optimizer_states.py [--seeds 3] [--epochs 2] [--max-bytes 400000]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap

from leantrain import fit, load_config
from leantrain.data import load_data
from leantrain.env import cpu_model
from leantrain.recipes import get_recipe
from leantrain.run.plan import build
from leantrain.run.trainer import Trainer
from leantrain.techniques.optimizer_states import state_bytes

RESULTS = Path(__file__).parent / "results"
BITS = 1 / math.log(2)
STATES = ("fp32", "bf16", "8bit", "4bit")


def config(args, states: str, seed: int, epochs: int):
    recipe = get_recipe("text-gpt")
    return load_config(None, [f"data.max_bytes={args.max_bytes}", f"train.epochs={epochs}",
                              f"train.seed={seed}", "train.monitor_interval_s=0",
                              "plan.precision=bf16", f"plan.optimizer_states={states}"],
                       {"recipe": recipe.name, **recipe.config})


def measured_state_bytes(args, states: str, bundle) -> int:
    cfg = config(args, states, 0, 1)
    run = build(cfg, get_recipe("text-gpt").build_model(256, cfg), bundle.train, bundle.val,
                measure_loader=False)
    trainer = Trainer(run, progress_bar=False)
    steps = trainer.steps()
    next(steps)
    found = state_bytes(trainer.state.optimizer)
    steps.close()
    return found


def interval(values: list[float], statistic=np.mean) -> list[float] | None:
    if len(values) < 2 or len(set(values)) < 2:
        return None
    res = bootstrap((np.array(values),), statistic, confidence_level=0.95, n_resamples=2000,
                    method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-bytes", type=int, default=400_000)
    parser.add_argument("--out", default=str(RESULTS / "optimizer_states.json"))
    args = parser.parse_args()
    recipe = get_recipe("text-gpt")
    bundle = load_data(config(args, "fp32", 0, args.epochs).data)
    result = {"machine": cpu_model(), "torch": torch.__version__, "data": bundle.description,
              "epochs": args.epochs, "max_bytes": args.max_bytes,
              "state_bytes": {s: measured_state_bytes(args, s, bundle) for s in STATES},
              "runs": []}
    for seed in range(args.seeds):
        order = STATES[seed % len(STATES):] + STATES[:seed % len(STATES)]
        for states in order:
            cfg = config(args, states, seed, args.epochs)
            torch.manual_seed(seed)
            summary = fit(recipe.build_model(256, cfg), bundle.train, bundle.val, cfg,
                          progress_bar=False)
            row = {"seed": seed, "states": states, "val_bits_per_byte": summary["val_loss"] * BITS,
                   "samples_per_second": summary["samples_per_second"],
                   "train_seconds": summary["train_seconds"]}
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    by = {(r["seed"], r["states"]): r for r in result["runs"]}
    seeds = range(args.seeds)
    result["summary"] = {}
    for states in STATES:
        speed = [by[s, states]["samples_per_second"] / by[s, "fp32"]["samples_per_second"]
                 for s in seeds]
        loss = [by[s, states]["val_bits_per_byte"] - by[s, "fp32"]["val_bits_per_byte"]
                for s in seeds]
        result["summary"][states] = {
            "state_bytes_over_fp32": result["state_bytes"][states] / result["state_bytes"]["fp32"],
            "val_bits_per_byte": statistics.mean(by[s, states]["val_bits_per_byte"] for s in seeds),
            "speed_over_fp32": statistics.median(speed), "speed_interval": interval(speed,
                                                                                     np.median),
            "bits_per_byte_minus_fp32": statistics.mean(loss), "loss_interval": interval(loss)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for states, s in result["summary"].items():
        print(f"{states:5s} states {s['state_bytes_over_fp32']:.2f}x fp32, speed "
              f"{s['speed_over_fp32']:.2f}x {s['speed_interval']}, bits/byte "
              f"{s['val_bits_per_byte']:.3f} ({s['bits_per_byte_minus_fp32']:+.3f} "
              f"{s['loss_interval']})")


if __name__ == "__main__":
    main()
