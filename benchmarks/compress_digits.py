"""Structured pruning of the trained digits-cnn at 50% of its channels, then fine-tuning.

Trains the digits-cnn recipe (its own config, seed 0), removes half the channels of every
conv (the classifier's outputs are kept) with Torch-Pruning's dependency graph and magnitude
importance, in `--steps` equal steps with `--finetune-epochs` of fine-tuning after each
(`leantrain.fit`, SGD, one-cycle at `--finetune-lr`). Reports parameters, multiply-adds
(FLOP counter / 2), file size of the saved state_dict, CPU latency at batch 1 and 64 in fp32,
model and batch channels_last (median of 30 forward passes after 5 warm-ups; the two models
alternate over `--latency-rounds` rounds, median of the rounds) and validation accuracy,
before and after.

    python benchmarks/compress_digits.py [--steps 2] [--finetune-epochs 4] [--finetune-lr 0.05]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from leantrain import fit, load_config
from leantrain.compress.prune import channel_counts, prune_channels, save_pruned
from leantrain.config import DataConfig
from leantrain.data import load_data
from leantrain.env import cpu_model
from leantrain.measure.flops import count_flops
from leantrain.measure.latency import latency_seconds, repeated
from leantrain.measure.plots import bar_panels
from leantrain.recipes import get_recipe

RESULTS = Path(__file__).parent / "results"


def describe(model: torch.nn.Module, sample: torch.Tensor, accuracy: float) -> dict:
    model = model.eval()
    with torch.no_grad():
        macs = count_flops(lambda: model(sample.unsqueeze(0))) // 2
    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(model, Path(tmp) / "m.pt")
        size = (Path(tmp) / "m.pt").stat().st_size
    return {"parameters": sum(p.numel() for p in model.parameters()), "macs": macs,
            "file_bytes": size, "val_accuracy": accuracy, "channels": channel_counts(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-lr", type=float, default=0.05)
    parser.add_argument("--latency-rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("leantrain").setLevel(logging.WARNING)
    recipe = get_recipe("digits-cnn")
    bundle = load_data(DataConfig())
    cfg = load_config(None, ["train.monitor_interval_s=0"], recipe.config)
    torch.manual_seed(0)
    model = recipe.build_model(10, cfg)
    trained = fit(model, bundle.train, bundle.val, cfg, None, progress_bar=False)
    sample = bundle.train.tensors[0][0]
    original = copy.deepcopy(model).eval()
    before = describe(original, sample, trained["val_accuracy"])

    tune_cfg = load_config(None, ["train.monitor_interval_s=0",
                                  f"train.epochs={args.finetune_epochs}",
                                  f"optim.lr={args.finetune_lr}"], recipe.config)
    tuned: list[dict] = []

    def finetune(pruned: torch.nn.Module, step: int) -> None:
        summary = fit(pruned, bundle.train, bundle.val, tune_cfg, None, progress_bar=False)
        tuned.append({"step": step, "val_accuracy": summary["val_accuracy"]})
        print(f"step {step}: fine-tuned to {summary['val_accuracy']:.2%}", flush=True)

    prune_channels(model, sample.unsqueeze(0), args.ratio, steps=args.steps, finetune=finetune)
    after = describe(model, sample, tuned[-1]["val_accuracy"])

    latency = {"before": {1: [], 64: []}, "after": {1: [], 64: []}}
    for r in range(args.latency_rounds):
        pairs = [("before", original), ("after", model)]
        for name, net in pairs if r % 2 == 0 else pairs[::-1]:
            for batch in (1, 64):
                latency[name][batch].append(latency_seconds(
                    net, repeated(sample, batch, channels_last=True), channels_last=True))
    for name, row in (("before", before), ("after", after)):
        for batch in (1, 64):
            row[f"latency_b{batch}_ms"] = 1e3 * statistics.median(latency[name][batch])
    ratios = {
        "macs": before["macs"] / after["macs"],
        "parameters": before["parameters"] / after["parameters"],
        "latency_b64": before["latency_b64_ms"] / after["latency_b64_ms"],
        "latency_b1": before["latency_b1_ms"] / after["latency_b1_ms"],
        "accuracy_drop_points": 100 * (before["val_accuracy"] - after["val_accuracy"]),
    }
    result = {"machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "settings": vars(args), "before": before, "after": after, "finetune": tuned,
              "ratios": ratios, "latency_rounds_seconds": latency}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compress_digits.json").write_text(json.dumps(result, indent=2))
    labels = ["trained digits-cnn", f"{args.ratio:.0%} channels pruned + fine-tuned"]
    bar_panels(labels, [("multiply-adds (M)", [before["macs"] / 1e6, after["macs"] / 1e6]),
                        ("latency batch 64 (ms)", [before["latency_b64_ms"],
                                                   after["latency_b64_ms"]]),
                        ("val accuracy (%)", [100 * before["val_accuracy"],
                                              100 * after["val_accuracy"]])],
               RESULTS / "compress_digits.png", f"structured pruning on {cpu_model()}",
               highlight=1, reference=None)
    print(f"MACs {ratios['macs']:.2f}x fewer, params {ratios['parameters']:.2f}x fewer, "
          f"latency b64 {ratios['latency_b64']:.2f}x lower (b1 {ratios['latency_b1']:.2f}x), "
          f"accuracy {100 * before['val_accuracy']:.2f}% -> {100 * after['val_accuracy']:.2f}% "
          f"({ratios['accuracy_drop_points']:+.2f} points drop)")


if __name__ == "__main__":
    main()
