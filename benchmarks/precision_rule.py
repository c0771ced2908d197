"""bf16 vs fp32 training steps on this CPU: the digits CNN and a tiny Hugging Face BERT.

The evidence for the precision rule (`techniques.precision.decide`): on a CPU, bf16 autocast
is the default for models with convolutions and fp32 for the others. Each model's real
training step (`Trainer.steps`, real batches) is timed in fp32 and bf16 in 7 interleaved
rounds (order reversed every other round); the result is the median of the per-round
bf16/fp32 ratios with its 95% bootstrap interval.

    python benchmarks/precision_rule.py   # writes benchmarks/results/precision_rule.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from leantrain import load_config  # noqa: E402
from leantrain.data import load_data  # noqa: E402
from leantrain.env import cpu_model  # noqa: E402
from leantrain.measure.rounds import interleave, interval, paired_ratios  # noqa: E402
from leantrain.measure.timing import timed_window  # noqa: E402
from leantrain.recipes.models import SmallCNN  # noqa: E402
from leantrain.run.plan import build  # noqa: E402
from leantrain.run.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "precision_rule.json"
ROUNDS, WARMUP, WINDOW_S = 7, 5, 2.0


def digits():
    bundle = load_data(load_config().data)
    return (lambda: SmallCNN(1, 10)), bundle.train, bundle.val, None, []


def bert():
    import hf_sequence_classification as ex
    from transformers.utils import logging

    logging.set_verbosity_error()
    train, val, pad = ex.data()
    return ex.model, train, val, pad, ["optim.name=adamw"]


def rate(setup, precision: str) -> float:
    build_model, train, val, collate, extra = setup
    torch.manual_seed(0)
    cfg = load_config(None, [f"plan.precision={precision}", "plan.device=cpu",
                             "data.num_workers=0", "train.monitor_interval_s=0", *extra])
    run = build(cfg, build_model(), train, val, measure_loader=False, collate_fn=collate)
    steps = Trainer(run, progress_bar=False).steps()
    try:
        timed_window(lambda: next(steps)[0], run.plan.device, lambda k, t: k >= WARMUP)
        samples, seconds = timed_window(lambda: next(steps)[0], run.plan.device,
                                        lambda k, t: t >= WINDOW_S)
    finally:
        steps.close()
    return samples / seconds


def main() -> None:
    result = {"machine": cpu_model(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rounds": ROUNDS, "window_s": WINDOW_S, "models": {}}
    for name, make in (("digits-cnn", digits), ("tiny-bert (examples)", bert)):
        setup = make()
        rates = interleave(["fp32", "bf16"], ROUNDS, lambda p, r, setup=setup: rate(setup, p))
        ratios = paired_ratios(rates["bf16"], rates["fp32"])
        low, high = interval(ratios)
        result["models"][name] = {"samples_per_second": rates, "bf16_over_fp32": ratios,
                                  "median": statistics.median(ratios), "interval": [low, high]}
        print(f"{name}: bf16 runs {statistics.median(ratios):.2f}x fp32's samples/s "
              f"(95% interval {low:.2f}-{high:.2f}x, {ROUNDS} rounds) on {cpu_model()}")
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
