"""int8 quantization (torchao) of a Linear-heavy model: size, output error, accuracy, latency.

Trains an MLP (flatten, 1024-1024-1024 with ReLU, 10 classes; 2.1 M parameters) on digits with
`leantrain.fit` (fp32 plan, so the reference is fp32), then compares fp32 with
int8-dynamic (int8 weights and activations) and int8-weight-only. For each: state_dict size,
worst output difference over the validation set (absolute, and relative to the largest fp32
output), validation accuracy, and CPU latency at batch 1 and 64, eager and under
`torch.compile` (median of 30 passes after 5 warm-ups, `--rounds` alternating rounds,
median of the rounds; compile time excluded).

    python benchmarks/quantize_mlp.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from pathlib import Path

import torch
from torch import nn

from leantrain import fit, load_config
from leantrain.compress.quantize import METHODS, output_error, quantize_linear, state_bytes
from leantrain.config import DataConfig
from leantrain.data import load_data
from leantrain.env import cpu_model
from leantrain.measure.latency import latency_seconds, repeated
from leantrain.measure.plots import bar_panels
from leantrain.recipes.models import MLP

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("leantrain").setLevel(logging.WARNING)
    bundle = load_data(DataConfig())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), MLP(32 * 32, 10, hidden=1024, depth=2))
    cfg = load_config(None, ["train.monitor_interval_s=0", "plan.precision=fp32",
                             "optim.lr=0.05"])
    fit(model, bundle.train, bundle.val, cfg, None, progress_bar=False)
    model = model.eval().cpu()
    xv, yv = bundle.val.tensors
    variants = {"fp32": model}
    for method in METHODS:
        variants[method] = quantize_linear(copy.deepcopy(model), method)
    rows = {}
    for name, net in variants.items():
        rows[name] = {"state_bytes": state_bytes(net), "val_accuracy": accuracy(net, xv, yv),
                      **(output_error(model, net, xv) if name != "fp32" else {})}
    compiled = {name: torch.compile(net) for name, net in variants.items()}
    sample = xv[0]
    times: dict[str, dict[str, list[float]]] = {
        name: {f"{mode}_b{b}": [] for mode in ("eager", "compiled") for b in (1, 64)}
        for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            for mode, net in (("eager", variants[name]), ("compiled", compiled[name])):
                for batch in (1, 64):
                    call = repeated(sample, batch)
                    times[name][f"{mode}_b{batch}"].append(latency_seconds(net, call))
    for name in variants:
        for key, values in times[name].items():
            rows[name][f"latency_{key}_ms"] = 1e3 * statistics.median(values)
        rows[name]["size_reduction"] = rows["fp32"]["state_bytes"] / rows[name]["state_bytes"]
    result = {"machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "parameters": sum(p.numel() for p in model.parameters()),
              "rounds": args.rounds, "results": rows, "latency_rounds_seconds": times}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize_mlp.json").write_text(json.dumps(result, indent=2))
    names = list(variants)
    bar_panels(names, [("state_dict (MB)", [rows[n]["state_bytes"] / 1e6 for n in names]),
                       ("latency b64 eager (ms)", [rows[n]["latency_eager_b64_ms"]
                                                   for n in names]),
                       ("latency b64 compiled (ms)", [rows[n]["latency_compiled_b64_ms"]
                                                      for n in names])],
               RESULTS / "quantize_mlp.png", f"torchao int8 on a 2.1 M-parameter MLP, "
               f"{cpu_model()}", reference=None)
    for name in names:
        row = rows[name]
        print(f"{name:17s} {row['state_bytes'] / 1e6:6.2f} MB ({row['size_reduction']:.2f}x) "
              f"acc {row['val_accuracy']:.2%} rel.err {row.get('max_rel_error', 0):.4f} "
              f"b64 eager {row['latency_eager_b64_ms']:.2f} ms compiled "
              f"{row['latency_compiled_b64_ms']:.2f} ms; b1 eager "
              f"{row['latency_eager_b1_ms']:.3f} compiled {row['latency_compiled_b1_ms']:.3f}")


if __name__ == "__main__":
    main()
