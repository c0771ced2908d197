"""The default plan against fp32 and bf16, as whole `leantrain train` runs of at least 60 s.

For the digits CNN (recipe digits-cnn) and a tiny BERT (examples/hf_sequence_classification,
dict batches, a padding collator), three plans are run as whole `leantrain train` processes,
in 3 interleaved rounds (order reversed every other round): `--precision fp32`,
`--precision bf16`, and the default (no flag: the rule, or a measurement when the run can pay
for one; each default run gets a fresh plan cache, so each decides anew). The figure is the
default's samples/s over the faster of fp32 and bf16 in the same round: median and 95%
bootstrap interval over the rounds. How the default decided (measured or rule, and what
measuring cost) is kept from each run's summary.

    python benchmarks/default_plan.py [--models digits-cnn]  # ~27 min on 2 cores for both;
                                      # writes results/default_plan.json (others kept)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from leantrain.env import cpu_model  # noqa: E402
from leantrain.measure.rounds import interleave, interval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "default_plan.json"
ROUNDS = 3
MODELS = {  # epochs sized so the fastest plan runs for at least 60 s here
    "digits-cnn": {"args": ["--epochs", "170"], "cwd": ROOT},
    "tiny-bert": {"args": ["--model", "hf_sequence_classification:model", "--data",
                           "hf_sequence_classification:data", "--set", "optim.name=adamw",
                           "--set", "optim.lr=3e-3", "--epochs", "900"],
                  "cwd": ROOT / "examples"},
}
PLANS = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"], "default": []}


def train(model: dict, plan: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "leantrain", "train", *model["args"],
                        *PLANS[plan], "--set", "train.monitor_interval_s=0", "--out", str(out),
                        "--no-progress"], check=True, capture_output=True, cwd=model["cwd"],
                       env={**__import__("os").environ, "LEANTRAIN_CACHE": tmp})
        summary = json.loads((out / "summary.json").read_text())
    outcomes = summary["plan"]["outcomes"]
    return {"samples_per_second": summary["samples_per_second"],
            "train_seconds": summary["train_seconds"], "precision": summary["plan"]["precision"],
            "outcomes": {k: outcomes[k] for k in ("precision", "channels_last",
                                                  "optimizer_impl")},
            "plan_measurement": summary.get("plan_measurement")}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="measure these again; the others' results in the file are kept")
    args = parser.parse_args()
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    keep = old.get("models", {}) if old.get("machine") == cpu_model() else {}
    result = {"machine": cpu_model(), "rounds": ROUNDS,
              "models": {k: v for k, v in keep.items() if k not in args.models}}
    for name in args.models:
        model = MODELS[name]
        runs = interleave(list(PLANS), ROUNDS, lambda plan, r, model=model: train(model, plan))
        ratios = [d["samples_per_second"] / max(a["samples_per_second"], b["samples_per_second"])
                  for d, a, b in zip(runs["default"], runs["fp32"], runs["bf16"], strict=True)]
        found = interval(ratios)
        shortest = min(r["train_seconds"] for plan_runs in runs.values() for r in plan_runs)
        result["models"][name] = {"runs": runs, "default_over_best": ratios,
                                  "shortest_run_s": shortest, "commit": _commit(),
                                  "date": time.strftime("%Y-%m-%d"),
                                  "median": statistics.median(ratios), "interval": found}
        print(f"{name}: the default plan ran at {statistics.median(ratios):.2f}x the faster of "
              f"fp32 and bf16 (95% interval {found[0]:.2f}-{found[1]:.2f}x, {ROUNDS} rounds; "
              f"default chose {runs['default'][0]['precision']}; shortest run {shortest:.0f} s) "
              f"on {cpu_model()}", flush=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
