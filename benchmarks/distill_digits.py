"""Knowledge distillation on digits: does KD help a 15x smaller student, and by how much?

Teacher: the default digits-cnn (SmallCNN, width 32), trained once with the default recipe.
Student: SmallCNN at width 8 (`leantrain.recipes.models:digits_student`), trained for a short
budget (--epochs) alone and with KD from cached teacher logits, over several seeds; then a small
temperature/alpha sweep. Figures are reported as measured, whichever way they go.

    python benchmarks/distill_digits.py [--seeds 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from leantrain import fit, load_config
from leantrain.data import load_data
from leantrain.losses.distillation import DistillationLoss, cache_teacher_logits
from leantrain.recipes.models import SmallCNN, digits_student

RESULTS = Path(__file__).parent / "results"


def train_student(bundle, teacher, train_data, seed, epochs, temperature=None, alpha=None):
    cfg = load_config(None, [f"train.seed={seed}", f"train.epochs={epochs}"])
    torch.manual_seed(seed)
    student = digits_student()
    loss = DistillationLoss(teacher, temperature, alpha) if temperature is not None else None
    kwargs = {"loss_fn": loss} if loss else {}
    data = train_data if loss else bundle.train
    return fit(student, data, bundle.val, cfg, progress_bar=False, **kwargs)["val_accuracy"]


def stats(values):
    return {"values": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    bundle = load_data(load_config().data)
    torch.manual_seed(0)
    teacher = SmallCNN(1, 10)
    teacher_summary = fit(teacher, bundle.train, bundle.val, load_config(), progress_bar=False)
    start = time.perf_counter()
    cached = cache_teacher_logits(teacher, bundle.train)
    cache_seconds = time.perf_counter() - start

    seeds = range(args.seeds)
    alone = [train_student(bundle, teacher, cached, s, args.epochs) for s in seeds]
    kd = [train_student(bundle, teacher, cached, s, args.epochs, 4.0, 0.9) for s in seeds]
    sweep = []
    for temperature in (2.0, 4.0, 8.0):
        for alpha in (0.5, 0.9):
            accs = [train_student(bundle, teacher, cached, s, args.epochs, temperature, alpha)
                    for s in seeds]
            sweep.append({"temperature": temperature, "alpha": alpha, **stats(accs)})
            print(f"T={temperature} alpha={alpha}: {statistics.mean(accs):.4f}", flush=True)
    timing = {}
    for name, data in (("live_teacher", bundle.train), ("cached_logits", cached)):
        cfg = load_config(None, [f"train.epochs={args.epochs}"])
        runs = [fit(digits_student(), data, bundle.val, cfg, progress_bar=False,
                    loss_fn=DistillationLoss(teacher, 4.0, 0.9))["step_seconds"]
                for _ in range(3)]
        timing[name] = statistics.median(runs)
    timing["caching_speedup"] = timing["live_teacher"] / timing["cached_logits"]
    result = {
        "student_epochs": args.epochs,
        "kd_step_seconds_median_of_3": timing,
        "teacher": {"val_accuracy": teacher_summary["val_accuracy"],
                    "parameters": sum(p.numel() for p in teacher.parameters())},
        "student_parameters": sum(p.numel() for p in digits_student().parameters()),
        "teacher_logit_cache_seconds": cache_seconds,
        "student_alone": stats(alone),
        "student_kd_T4_a0.9": stats(kd),
        "sweep": sweep,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_digits.json").write_text(json.dumps(result, indent=2))
    kd_stats = result["student_kd_T4_a0.9"]
    print(f"student alone {result['student_alone']['mean']:.4f} ± "
          f"{result['student_alone']['std']:.4f}; with KD (T=4, a=0.9) "
          f"{kd_stats['mean']:.4f} ± {kd_stats['std']:.4f}; "
          f"cached teacher logits make KD steps {timing['caching_speedup']:.2f}x faster")


if __name__ == "__main__":
    main()
