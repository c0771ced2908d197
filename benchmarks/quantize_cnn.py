"""int8-static (pt2e, x86 Inductor quantizer) on the digits CNN: accuracy and CPU latency.

Trains digits-cnn with `leantrain.fit` (fp32 plan: the reference is fp32), quantizes it with
`leantrain.compress.quantize.quantize_pt2e` calibrated on 8 training batches of 64, and
compares:

- validation accuracy, fp32 against int8 (the converted graph run eagerly: the same int8
  numerics as its compiled kernels, quantize/dequantize made explicit);
- CPU latency at batch 64: fp32 eager, fp32 under `torch.compile`, int8 under
  `torch.compile` (how int8-static runs), compiled with Inductor's `freezing` (weights folded
  into constants, as the pt2e x86 recipe asks), all NCHW; median of 30 passes after 5 warm-ups, in
  `--rounds` interleaved rounds; the speed-ups are paired per round, with a 95% bootstrap
  interval. Compile time is excluded (reported apart).

    python benchmarks/quantize_cnn.py [--rounds 5]   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from leantrain import fit, load_config  # noqa: E402
from leantrain.compress.quantize import quantize_pt2e, state_bytes  # noqa: E402
from leantrain.config import DataConfig  # noqa: E402
from leantrain.data import load_data  # noqa: E402
from leantrain.env import cpu_model  # noqa: E402
from leantrain.measure.latency import latency_seconds, repeated  # noqa: E402
from leantrain.measure.rounds import interleave, interval, paired_ratios  # noqa: E402
from leantrain.recipes.models import SmallCNN  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quantize_cnn.json"


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    hits = sum(int((model(x[i:i + 64]).argmax(1) == y[i:i + 64]).sum())
               for i in range(0, len(x), 64))
    return hits / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("leantrain").setLevel(logging.WARNING)
    bundle = load_data(DataConfig())
    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    cfg = load_config(None, ["train.monitor_interval_s=0", "plan.precision=fp32",
                             "plan.channels_last=false"])
    fit(model, bundle.train, bundle.val, cfg, None, progress_bar=False)
    model = model.eval().cpu()
    xt, _ = bundle.train.tensors
    xv, yv = bundle.val.tensors
    sample = xv[0]
    start = time.perf_counter()
    int8 = quantize_pt2e(copy.deepcopy(model), xt[:64], [xt[i:i + 64] for i in range(0, 512, 64)])
    quantize_s = time.perf_counter() - start
    acc = {"fp32": accuracy(model, xv, yv), "int8": accuracy(int8, xv, yv)}
    # freezing folds the weights into constants, which lets Inductor pack them for its int8
    # kernels (the pt2e x86 recipe); applied to both compiled variants alike
    torch._inductor.config.freezing = True
    variants = {"fp32 eager": model, "fp32 compiled": torch.compile(copy.deepcopy(model)),
                "int8 compiled": torch.compile(int8)}
    compile_s = {}
    with torch.no_grad():
        for name, net in variants.items():  # compile (and warm) outside the timed rounds
            tick = time.perf_counter()
            net(sample.unsqueeze(0).expand(64, *sample.shape).contiguous())
            compile_s[name] = time.perf_counter() - tick
    rounds = interleave(list(variants), args.rounds,
                        lambda name, r: 1e3 * latency_seconds(variants[name], repeated(sample, 64)))
    result = {"machine": cpu_model(), "torch": torch.__version__, "rounds": args.rounds,
              "inductor_freezing": True,
              "date": time.strftime("%Y-%m-%d"), "val_accuracy": acc,
              "accuracy_drop_points": 100 * (acc["fp32"] - acc["int8"]),
              "state_bytes": {"fp32": state_bytes(model)}, "quantize_seconds": quantize_s,
              "first_call_seconds": compile_s, "latency_b64_ms": rounds,
              "median_ms": {k: statistics.median(v) for k, v in rounds.items()},
              "speedups": {}}
    for ref in ("fp32 eager", "fp32 compiled"):
        ratios = paired_ratios(rounds[ref], rounds["int8 compiled"])  # ref time / int8 time
        found = interval(ratios)
        result["speedups"][f"int8 compiled vs {ref}"] = {
            "ratios": ratios, "median": statistics.median(ratios),
            "interval": list(found) if found else None}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"digits-cnn int8-static (pt2e) on {cpu_model()}: accuracy {acc['fp32']:.2%} -> "
          f"{acc['int8']:.2%} ({result['accuracy_drop_points']:+.2f} points drop)")
    for name, found in result["speedups"].items():
        low, high = found["interval"] or (float("nan"), float("nan"))
        print(f"  {name}: {found['median']:.2f}x faster at batch 64 (95% interval "
              f"{low:.2f}-{high:.2f}x, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
