"""Per-token knowledge distillation on the text-gpt recipe: does KD help a small byte GPT?

Teacher: the text-gpt recipe's default GPT (4 blocks, width 192, 1.85 M parameters), trained
as `leantrain train --recipe text-gpt` would, on --max-bytes of the Python standard library's
sources. Student: `leantrain.recipes.models:text_gpt_student` (2 blocks, width 96), trained
for the same budget (--student-epochs over the same bytes) alone and with per-token KD from
the teacher's cached logits, over --seeds seeds, for each (T, alpha) setting. Scores: the
validation loss in bits per byte (lower is better) and next-byte accuracy, on held-out files.
The paired difference per seed (KD minus alone) gets a bootstrap 95% interval over seeds.
Figures are reported as measured, whichever way they go.

    python benchmarks/distill_gpt.py [--seeds 3] [--max-bytes 1000000]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap

from leantrain import fit, load_config
from leantrain.data import load_data
from leantrain.env import cpu_model
from leantrain.losses.distillation import DistillationLoss, cache_teacher_logits
from leantrain.recipes import get_recipe
from leantrain.recipes.models import text_gpt_student

RESULTS = Path(__file__).parent / "results"
BITS = 1 / math.log(2)  # nats -> bits


def config(args, epochs: int, seed: int):
    recipe = get_recipe("text-gpt")
    return load_config(None, [f"data.max_bytes={args.max_bytes}", f"train.epochs={epochs}",
                              f"train.seed={seed}", "train.monitor_interval_s=0"],
                       {"recipe": recipe.name, **recipe.config})


def interval(differences: list[float]) -> list[float] | None:
    if len(differences) < 2 or len(set(differences)) < 2:
        return None
    res = bootstrap((np.array(differences),), np.mean, confidence_level=0.95,
                    n_resamples=2000, method="percentile", random_state=0)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def score(summary) -> dict:
    return {"val_bits_per_byte": summary["val_loss"] * BITS,
            "val_accuracy": summary["val_accuracy"], "train_seconds": summary["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--settings", default="4:0.9,2:0.5,1:0.5",
                        help="T:alpha pairs, comma-separated (the first is the CLI default)")
    args = parser.parse_args()
    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings.split(",")]
    logging.disable(logging.INFO)
    start = time.perf_counter()
    cfg = config(args, args.teacher_epochs, 0)
    bundle = load_data(cfg.data)
    print(bundle.description, flush=True)
    torch.manual_seed(0)
    teacher = get_recipe("text-gpt").build_model(256, cfg)
    teacher_summary = fit(teacher, bundle.train, bundle.val, cfg, progress_bar=False)
    print(f"teacher: {teacher_summary['val_loss'] * BITS:.3f} bits/byte", flush=True)
    cached = cache_teacher_logits(teacher, bundle.train, 64)
    if cached is None:
        raise SystemExit("the teacher's logits do not fit the cache; lower --max-bytes")

    runs: dict[str, list[dict]] = {"alone": []}
    for seed in range(args.seeds):
        student_cfg = config(args, args.student_epochs, seed)
        torch.manual_seed(seed)
        runs["alone"].append(score(fit(text_gpt_student(), bundle.train, bundle.val,
                                       student_cfg, progress_bar=False)))
        for temperature, alpha in settings:
            torch.manual_seed(seed)
            loss = DistillationLoss(teacher, temperature, alpha, "token-classification")
            summary = fit(text_gpt_student(), cached, bundle.val, student_cfg,
                          progress_bar=False, loss_fn=loss)
            runs.setdefault(f"kd_T{temperature:g}_a{alpha:g}", []).append(score(summary))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['val_bits_per_byte']:.3f}"
                                           for k, v in runs.items()), flush=True)

    def stats(name: str, key: str) -> dict:
        values = [r[key] for r in runs[name]]
        return {"values": values, "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    results = {}
    for name in runs:
        entry = {key: stats(name, key) for key in ("val_bits_per_byte", "val_accuracy")}
        entry["train_seconds_mean"] = statistics.mean(r["train_seconds"] for r in runs[name])
        if name != "alone":
            diff = [kd["val_bits_per_byte"] - alone["val_bits_per_byte"]
                    for kd, alone in zip(runs[name], runs["alone"], strict=True)]
            entry["bits_per_byte_minus_alone"] = {"values": diff,
                                                  "mean": statistics.mean(diff),
                                                  "bootstrap95": interval(diff)}
        results[name] = entry
    result = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "data": bundle.description, "max_bytes": args.max_bytes,
        "teacher": {"parameters": sum(p.numel() for p in teacher.parameters()),
                    "epochs": args.teacher_epochs,
                    "val_bits_per_byte": teacher_summary["val_loss"] * BITS,
                    "val_accuracy": teacher_summary["val_accuracy"]},
        "student": {"parameters": sum(p.numel() for p in text_gpt_student().parameters()),
                    "epochs": args.student_epochs},
        "seeds": args.seeds, "students": results,
        "wall_seconds": time.perf_counter() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_gpt.json").write_text(json.dumps(result, indent=2))
    for name, entry in results.items():
        bpb = entry["val_bits_per_byte"]
        line = f"{name}: {bpb['mean']:.3f} ± {bpb['std']:.3f} bits/byte"
        if "bits_per_byte_minus_alone" in entry:
            d = entry["bits_per_byte_minus_alone"]
            line += f"; KD - alone {d['mean']:+.3f} (95% {d['bootstrap95']})"
        print(line)


if __name__ == "__main__":
    main()
