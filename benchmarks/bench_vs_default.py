"""Is the plan `leantrain bench` writes at least as fast as the default plan? On a tiny BERT.

1. Runs `leantrain bench` on the tiny BERT classifier of examples/hf_sequence_classification
   (a stock `BertForSequenceClassification`, dict batches, a padding collator), as a user would.
2. Trains with its `plan.yaml` (`train --plan`) and with the default plan (no plan: the rule,
   or a measurement where the run can pay), as whole `leantrain train` processes of at least
   60 s, in 3 interleaved rounds (order reversed every other round). Each default run gets a
   fresh plan cache, so each decides anew.
3. The figure: the plan's samples/s over the default's in the same round, median and 95%
   bootstrap interval. The floor (issue 16): 0.97x.

    python benchmarks/bench_vs_default.py   # ~14 min on 2 cores -> results/bench_vs_default.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from leantrain.env import cpu_model  # noqa: E402
from leantrain.measure.rounds import interleave, interval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_vs_default.json"
EXAMPLES = ROOT / "examples"
ROUNDS, BENCH_BUDGET_S = 3, 180
MODEL = ["--model", "hf_sequence_classification:model", "--data",
         "hf_sequence_classification:data", "--set", "optim.name=adamw", "--set", "optim.lr=3e-3"]
EPOCHS = ["--epochs", "900"]  # about 80 s at this model's fp32 rate on a 2-core Xeon


def leantrain(*args: str, cache: str) -> None:
    subprocess.run([sys.executable, "-m", "leantrain", *args, "--no-progress"], check=True,
                   capture_output=True, cwd=EXAMPLES, env={**os.environ, "LEANTRAIN_CACHE": cache})


def train(plan_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        leantrain("train", *MODEL, *EPOCHS, *plan_args, "--set", "train.monitor_interval_s=0",
                  "--out", str(out), cache=tmp)
        summary = json.loads((out / "summary.json").read_text())
    return {"samples_per_second": summary["samples_per_second"],
            "train_seconds": summary["train_seconds"], "plan": summary["plan"],
            "plan_measurement": summary.get("plan_measurement")}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bench_dir = Path(tmp) / "bench"
        leantrain("bench", *MODEL, "--budget-s", str(BENCH_BUDGET_S), "--out", str(bench_dir),
                  cache=tmp)
        bench = json.loads((bench_dir / "bench.json").read_text())
        plan_text = (bench_dir / "plan.yaml").read_text()
        plan_file = Path(tmp) / "plan.yaml"
        plan_file.write_text(plan_text)
        plans = {"bench plan": ["--plan", str(plan_file)], "default": []}
        runs = interleave(list(plans), ROUNDS, lambda name, r: train(plans[name]))
    ratios = [p["samples_per_second"] / d["samples_per_second"]
              for p, d in zip(runs["bench plan"], runs["default"], strict=True)]
    found = interval(ratios)
    shortest = min(r["train_seconds"] for plan_runs in runs.values() for r in plan_runs)
    result = {"machine": cpu_model(), "rounds": ROUNDS, "bench_budget_s": BENCH_BUDGET_S,
              "bench": {"winner": bench["winner"], "versus_default": bench["versus_default"],
                        "trials": {t["name"]: {k: t[k] for k in ("status", "speedup",
                                                                 "speedup_interval", "noisy",
                                                                 "check", "reason")}
                                   for t in bench["trials"]}},
              "plan_yaml": plan_text, "runs": runs, "plan_over_default": ratios,
              "median": statistics.median(ratios), "interval": found,
              "shortest_run_s": shortest}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"tiny BERT: the bench's plan (winner {bench['winner']}; "
          f"{bench['versus_default']['verdict']}) ran at {statistics.median(ratios):.2f}x the "
          f"default plan's samples/s (95% interval {found[0]:.2f}-{found[1]:.2f}x, {ROUNDS} "
          f"rounds of whole runs, shortest {shortest:.0f} s) on {cpu_model()}")


if __name__ == "__main__":
    main()
