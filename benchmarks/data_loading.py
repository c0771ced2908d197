"""Data loading with per-item work: `DataLoader(num_workers=0)` vs the measured (tuned) loader.

The dataset is digits (32×32) with a per-item augmentation written in torch: a random affine
warp (rotation, scale, shift) through `affine_grid`/`grid_sample`, a 5×5 blur, contrast and
brightness jitter and pixel noise. The model is the digits-cnn recipe's, under leantrain's
default plan for this machine.

1. Candidates: every loader setting the tuner considers (workers 0, 1, 2, ...; each with and
   without fewer compute threads; a deeper prefetch queue for the best), measured as the tuner
   does (the model's forward and backward on real batches) but in long windows and several
   interleaved rounds: samples/s and the share of time spent waiting for data.
2. Runs: `fit` for `--epochs` with `data.num_workers=0` against `data.num_workers=auto`,
   alternating, medians over `--repeats`. Samples/s and the data-wait share come from each
   run's summary (the step-time breakdown); each run's wall time includes the auto arm's
   measuring (or its decision not to measure).

    python benchmarks/data_loading.py [--repeats 3] [--epochs 20] [--window-s 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from leantrain import fit, load_config
from leantrain.config import DataConfig
from leantrain.data import load_data
from leantrain.data.loaders import LoaderOptions
from leantrain.data.tuning import tune_loader
from leantrain.env import cpu_model
from leantrain.measure.plots import bar_panels
from leantrain.measure.probe import untouched
from leantrain.recipes.models import SmallCNN
from leantrain.run import step
from leantrain.run.plan import build

RESULTS = Path(__file__).parent / "results"
_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
BLUR = (_BLUR[:, None] * _BLUR[None, :] / _BLUR.sum() ** 2)[None, None]


def augment(image: torch.Tensor) -> torch.Tensor:
    """A random affine warp, blur, contrast/brightness jitter and noise on one (C, H, W) image."""
    angle = (torch.rand(()) * 30 - 15) * math.pi / 180
    scale = 0.9 + 0.2 * torch.rand(())
    shift = (torch.rand(2) - 0.5) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[0]]),
                         torch.stack([sin, cos, shift[1]])]).unsqueeze(0)
    grid = F.affine_grid(theta, (1, *image.shape), align_corners=False)
    out = F.grid_sample(image.unsqueeze(0), grid, align_corners=False, padding_mode="border")
    out = F.conv2d(F.pad(out, (2, 2, 2, 2), mode="reflect"), BLUR)
    mean = out.mean()
    out = (out - mean) * (0.8 + 0.4 * torch.rand(())) + mean + 0.1 * torch.randn(())
    return (out + 0.05 * torch.randn_like(out))[0]


class AugmentedDigits(Dataset):
    """Digits images augmented on every access: per-item work no batched indexing can skip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return augment(self.images[i]), self.labels[i]


def run(arm: str, epochs: int, train: Dataset, val: Dataset) -> dict:
    workers = "0" if arm == "workers=0" else "auto"
    cfg = load_config(None, [f"train.epochs={epochs}", f"data.num_workers={workers}",
                             "train.monitor_interval_s=0.5"])
    torch.manual_seed(0)
    start = time.perf_counter()
    summary = fit(SmallCNN(1, 10), train, val, cfg, None, progress_bar=False)
    wall = time.perf_counter() - start
    breakdown = summary["step_breakdown"]
    return {
        "wall_seconds_with_tuning": wall,
        "samples_per_second": summary["samples_per_second"],
        "data_wait_fraction": breakdown["fractions"]["data"],
        "breakdown": breakdown["fractions"],
        "val_accuracy": summary["val_accuracy"],
        "train_loader": summary["train_loader"],
        "tuning": summary["loader_tuning"],
        "cpu_percent_mean": summary["monitor"]["cpu_percent"]["mean"],
    }


def candidates(train: Dataset, val: Dataset, window_s: float, rounds: int) -> dict:
    """Every loader candidate the tuner considers, each measured in long windows."""
    cfg = load_config(None, ["data.num_workers=0"])
    torch.manual_seed(0)
    run = build(cfg, SmallCNN(1, 10), train, val, measure_loader=False)
    auto = {"num_workers", "pin_memory", "prefetch_factor", "persistent_workers"}
    with untouched(run.model):
        tuning = tune_loader(train, cfg.data.batch_size,
                             lambda batch: step.probe(run.model, batch, run.plan, run.loss_fn),
                             LoaderOptions(),
                             auto, on_cuda=False, epochs=cfg.train.epochs,
                             window_s=window_s, rounds=rounds)
    return tuning.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--window-s", type=float, default=2.0,
                        help="timed seconds per candidate and round in the candidate table")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundle = load_data(DataConfig())
    train = AugmentedDigits(*bundle.train.tensors)
    table = candidates(train, bundle.val, args.window_s, args.rounds)
    for row in table["measured"]:
        print(f"candidate [{row['options']}]: {row['samples_per_second']:,.0f} samples/s, data "
              f"wait {row['data_wait_fraction']:.0%}", flush=True)
    arms = ["workers=0", "tuned"]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(args.repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            runs[arm].append(run(arm, args.epochs, train, bundle.val))
            last = runs[arm][-1]
            print(f"repeat {r} {arm}: {last['samples_per_second']:,.0f} samples/s, data wait "
                  f"{last['data_wait_fraction']:.0%} ({last['train_loader']})", flush=True)
    median = {arm: {key: statistics.median(x[key] for x in runs[arm])
                    for key in ("samples_per_second", "data_wait_fraction", "cpu_percent_mean",
                                "wall_seconds_with_tuning")}
              for arm in arms}
    result = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "epochs": args.epochs, "repeats": args.repeats,
        "candidates": table,
        "median": median,
        "speedup": (median["tuned"]["samples_per_second"]
                    / median["workers=0"]["samples_per_second"]),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_loading.json").write_text(json.dumps(result, indent=2))
    rows = table["measured"]
    labels = [row["options"].replace(", pin_memory=False", "").replace(
        ", persistent_workers=False", "") for row in rows]
    panels = [("samples/s (median of rounds)", [row["samples_per_second"] for row in rows]),
              ("data wait, share of time", [row["data_wait_fraction"] for row in rows])]
    best = next(i for i, row in enumerate(rows) if row["options"] == table["choice"].replace(
        ", persistent_workers=True", ", persistent_workers=False"))
    bar_panels(labels, panels, RESULTS / "data_loading.png",
               f"digits + per-item augmentation, {cpu_model()}, {torch.get_num_threads()} "
               f"threads: loader candidates (chosen: orange)", highlight=best, reference=None)
    print(f"median: workers=0 {median['workers=0']['samples_per_second']:,.0f} samples/s "
          f"(data wait {median['workers=0']['data_wait_fraction']:.0%}), tuned "
          f"{median['tuned']['samples_per_second']:,.0f} samples/s (data wait "
          f"{median['tuned']['data_wait_fraction']:.0%}) -> {result['speedup']:.2f}x; wall time "
          f"with tuning {median['workers=0']['wall_seconds_with_tuning']:.1f} s vs "
          f"{median['tuned']['wall_seconds_with_tuning']:.1f} s")


if __name__ == "__main__":
    main()
