"""`fit` with no plan flags against the two plans a user would pick by hand, on short runs.

Issue 44: for 400-step runs of a tiny GPT-2, a tiny BERT and the digits CNN (`plain_loop.CASES`,
each with its user's optimizer, lr and batch size), the whole-run wall time of

- plain: the seed documents' loop in fp32 (`peers._plain`: torch's default optimizer kernels);
- plain-bf16-fused: the same loop under bf16 autocast with the fused optimizer kernels;
- leantrain: `fit` given only the user's settings (no plan flags, a cold plan cache: the run's
  own first steps decide precision, optimizer kernels and channels_last, `run.deciding`);

each a fresh process (imports and data generation not timed; model construction, training,
validation and leantrain's deciding are), the three rotated from round to round. The figure
is leantrain's wall time over the faster plain loop's in the same round: median and 95%
bootstrap interval over the rounds (the acceptance: within 1.05x). After each round's
leantrain run, `fit` runs again with the plan that run decided set explicitly from the first
step (leantrain-winner, not timed against the loops), and the two final validation losses are
compared with the learning check's tolerance (within +-5% or 0.05, tests/test_learning_check).

    python benchmarks/decide_while_training.py [--rounds 3] [--models cnn-sgd]
    python benchmarks/decide_while_training.py --quick   # 1 round of 40 steps: it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peers import _epochs, _leantrain, _loader, _plain
from plain_loop import CASES, OPTIMIZERS, batch_loss, val_loss

from leantrain.env import cpu_model
from leantrain.measure.load import LoadWatch
from leantrain.measure.rounds import interval

RESULTS = Path(__file__).parent / "results" / "decide_while_training.json"
MODELS = ["gpt2-causal-lm", "bert-classifier", "cnn-sgd"]
TIMED = ["plain", "plain-bf16-fused", "leantrain"]
STEPS = 400
KEYS = ("precision", "channels_last", "optimizer_impl")


def _plain_bf16_fused(case, train, val, collate, epochs: int) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = case.model()
    extra = {"momentum": case.momentum} if case.momentum is not None else {}
    opt = OPTIMIZERS[case.optimizer](model.parameters(), lr=case.lr, fused=True, **extra)
    for _ in range(epochs):
        model.train()
        for batch in _loader(case, train, True, collate):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = batch_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        found = val_loss(case, model)
    return found, {}


def _winner(plan: dict):
    settings = tuple(f"plan.{k}={str(v).lower()}" for k, v in plan.items())
    return lambda case, train, val, collate, epochs: _leantrain(case, train, val, collate,
                                                                epochs, settings)


def one(trainer: str, model: str, steps: int, plan: dict) -> dict:
    case = CASES[model]
    train, val, collate = case.data()
    epochs = _epochs(case, train, steps)
    runner = {"plain": _plain, "plain-bf16-fused": _plain_bf16_fused, "leantrain": _leantrain,
              "leantrain-winner": _winner(plan)}[trainer]
    with LoadWatch() as watch:
        start = time.perf_counter()
        loss, details = runner(case, train, val, collate, epochs)
        wall = time.perf_counter() - start
    return {"trainer": trainer, "model": model, "epochs": epochs, "wall_s": wall,
            "val_loss": loss, "details": details, "load": watch.reading.to_dict()}


def _subprocess(trainer: str, model: str, steps: int, plan: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out, \
            tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, __file__, "--one", trainer, model, str(steps),
                        json.dumps(plan), out.name], check=True,
                       env={**os.environ, "LEANTRAIN_CACHE": cache})
        return json.loads(Path(out.name).read_text())


def _rounds(models: list[str], steps: int, rounds: int) -> list[dict]:
    runs = []
    for r in range(rounds):
        for model in models:
            order = TIMED[r % len(TIMED):] + TIMED[:r % len(TIMED)]
            found = {name: _subprocess(name, model, steps, {}) for name in order}
            decided = {k: found["leantrain"]["details"][k] for k in KEYS}
            found["leantrain-winner"] = _subprocess("leantrain-winner", model, steps, decided)
            for name, run in found.items():
                run["round"] = r
                runs.append(run)
                print(f"round {r} {model:16s} {name:18s} {run['wall_s']:7.1f} s  "
                      f"val {run['val_loss']:.4f}" + ("  BUSY" if run["load"]["busy"] else ""),
                      flush=True)
    return runs


def _verdict(runs: list[dict]) -> dict:
    """The faster loop is the one with the lower median whole-run time over the rounds, and
    leantrain's time is paired with its time in each round. (The faster of the two in each
    round would be the luckier of two noisy draws: on this machine whole runs of the same plan
    spread +-20% from round to round, and the minimum of two such draws sits ~10% below
    either's median.)"""
    by_round: dict[int, dict[str, dict]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["trainer"]] = run
    loop = min(("plain", "plain-bf16-fused"),
               key=lambda name: statistics.median(r[name]["wall_s"] for r in by_round.values()))
    ratios = [r["leantrain"]["wall_s"] / r[loop]["wall_s"] for r in by_round.values()]
    found = interval(ratios)
    losses = [(r["leantrain"]["val_loss"], r["leantrain-winner"]["val_loss"])
              for r in by_round.values()]
    ours = [r["leantrain"]["details"] for r in by_round.values()]
    return {
        "faster_loop": loop,
        "leantrain_over_faster_loop": ratios,
        "median": statistics.median(ratios), "interval_95": list(found) if found else None,
        "within_1_05": bool(found and found[1] <= 1.05),
        "median_wall_s": {name: statistics.median(r[name]["wall_s"] for r in by_round.values())
                          for name in [*TIMED, "leantrain-winner"]},
        "val_loss_default_vs_winner": losses,
        "learning_within_tolerance": all(abs(a - b) <= max(0.05, 0.05 * b) for a, b in losses),
        "decided": [{k: d[k] for k in KEYS} for d in ours],
        "outcomes": [d["outcomes"] for d in ours],
        "busy_runs": sum(run["load"]["busy"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=sorted(CASES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=5, metavar=("TRAINER", "MODEL", "STEPS", "PLAN", "OUT"))
    args = parser.parse_args()
    if args.one:
        trainer, model, steps, plan, out = args.one
        Path(out).write_text(json.dumps(one(trainer, model, int(steps), json.loads(plan))))
        return
    rounds, steps = (1, 40) if args.quick else (args.rounds, STEPS)
    began = time.perf_counter()
    runs = _rounds(args.models, steps, rounds)
    verdicts = {model: _verdict([r for r in runs if r["model"] == model])
                for model in args.models}
    for model, verdict in verdicts.items():
        print(model, json.dumps({k: verdict[k] for k in ("median", "interval_95",
                                                         "learning_within_tolerance")}))
    record = {"machine": {"cpu": cpu_model(), "arch": platform.machine(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "steps_at_least": steps, "rounds": rounds,
              "seconds": time.perf_counter() - began, "verdicts": verdicts, "runs": runs}
    if not args.quick and RESULTS.exists():  # a run of some models keeps the others'
        kept = json.loads(RESULTS.read_text())
        if kept["machine"] == record["machine"]:
            record["verdicts"] = {**kept["verdicts"], **record["verdicts"]}
            record["runs"] = [r for r in kept["runs"] if r["model"] not in args.models] + runs
            record["rounds"] = {**_rounds_of(kept), **{m: rounds for m in args.models}}
    if not args.quick:
        RESULTS.write_text(json.dumps(record, indent=1))


def _rounds_of(record: dict) -> dict:
    rounds = record["rounds"]
    return rounds if isinstance(rounds, dict) else {m: rounds for m in record["verdicts"]}


if __name__ == "__main__":
    main()
