"""Every model users bring, through every command, as a user runs them (issue 42).

Each shape of `tests/shapes.py` (LoRA GPT-2, T5, Whisper, Mixtral and Qwen2-MoE with their
router loss, CLIP, a denoiser that draws its noise in `forward`, Qwen2 with the user's own
reentrant checkpointing, Llama and a GQA Llama) goes through `train`, `doctor`,
`find-batch-size`, `compress --prune 0.5`, `compress --quantize int8`, `distill`, `bench` and
`launch --nproc 2 -- train`, each a fresh process. Recorded per command: the exit code, its wall
time, whether stderr holds a traceback (never allowed), and the one line of a refusal (exit 2),
with the figures the issue named (MoE task and auxiliary loss, the int8 verdicts).

    python benchmarks/every_model.py            # every shape and command (about 25 minutes)
    python benchmarks/every_model.py --quick    # two shapes, no bench or launch
    python benchmarks/every_model.py --shapes denoiser llama_gqa   # again, rows replaced
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from leantrain.env import cpu_model

RESULTS = Path(__file__).parent / "results" / "every_model.json"
TESTS = Path(__file__).resolve().parents[1] / "tests"
SHAPES = {  # model: (data, student)
    "gpt2_lora": ("lm_data", "gpt2_lora_student"), "t5": ("seq2seq_data", "t5_student"),
    "whisper": ("audio_data", "whisper_student"), "mixtral": ("lm_data", "mixtral"),
    "qwen2_moe": ("lm_data", "qwen2_moe"), "clip": ("clip_data", "clip"),
    "denoiser": ("image_data", "denoiser"),
    "qwen2_checkpointed": ("lm_data", "qwen2_checkpointed"), "llama": ("lm_data", "llama"),
    "llama_gqa": ("lm_data", "llama_gqa"),
}
COMMON = ["--set", "optim.name=adamw", "--set", "optim.lr=3e-3", "--set", "data.batch_size=16",
          "--no-progress"]


def commands(name: str, run: Path, quick: bool) -> dict[str, list[str]]:
    data, student = SHAPES[name]
    source = ["--model", f"shapes:{name}", "--data", f"shapes:{data}", *COMMON]
    found = {
        "doctor": ["doctor", *source, "--steps", "5", "--no-compile-check"],
        "find-batch-size": ["find-batch-size", *source, "--max-size", "32"],
        "prune": ["compress", *source, "--checkpoint", str(run), "--prune", "0.5",
                  "--finetune-epochs", "1"],
        "int8": ["compress", *source, "--checkpoint", str(run), "--quantize", "int8"],
        "distill": ["distill", *source, "--set", "train.max_steps=20", "--teacher", str(run),
                    "--student-model", f"shapes:{student}"],
    }
    if not quick:
        found["bench"] = ["bench", *source, "--budget-s", "30", "--keep-batch-size"]
        found["launch"] = ["launch", "--nproc", "2", "--", "train", *source,
                           "--set", "train.max_steps=10"]
    return found


def execute(argv: list[str], out: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "leantrain.cli", *argv, "--out", str(out)],
                          cwd=TESTS, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "LEANTRAIN_CACHE": str(out.parent / "cache")})
    lines = [line for line in done.stderr.splitlines() if line.startswith("leantrain:")]
    return {"rc": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "traceback": "Traceback (most recent call last)" in done.stderr,
            "refusal": lines[-1] if done.returncode == 2 and lines else None}


def figures(name: str, folder: Path) -> dict:
    """What the issue measured wrong, read back from the outputs."""
    found = {}
    summary = folder / "run" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        found["train"] = {k: s.get(k) for k in ("val_loss", "val_task_loss", "val_aux_loss",
                                                "val_perplexity", "flops_per_sample", "mfu",
                                                "evaluation", "loss")}
        found["train"]["checkpointing"] = s["plan"]["outcomes"]["activation_checkpointing"]
    for stage in ("prune", "int8"):
        report = folder / stage / "report.json"
        if report.is_file():
            stages = json.loads(report.read_text())["stages"]
            found[stage] = [{k: st.get(k) for k in ("stage", "macs", "val_loss", "verdict",
                                                    "why")} for st in stages]
    kd = folder / "distill" / "report.json"
    if kd.is_file():
        report = json.loads(kd.read_text())
        found["distill"] = {row: {k: report[row].get(k) for k in
                                  ("val_loss", "val_aux_loss", "val_perplexity")}
                            for row in ("teacher", "student_alone", "student_kd")}
    found["outputs"] = sorted(p.name for p in (folder / "run").iterdir() if p.is_dir())
    return found


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                        help="run these shapes again, their rows replaced in the results")
    args = parser.parse_args()
    names = ["gpt2_lora", "t5"] if args.quick else args.shapes or list(SHAPES)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = Path(tmp) / name
            folder.mkdir()
            run = folder / "run"
            data = SHAPES[name][0]
            rows[name] = {"train": execute(["train", "--model", f"shapes:{name}", "--data",
                                            f"shapes:{data}", *COMMON,
                                            "--set", "train.max_steps=60"], run)}
            for label, argv in commands(name, run, args.quick).items():
                rows[name][label] = execute(argv, folder / label)
                print(f"{name:20s} {label:16s} {rows[name][label]}", flush=True)
            rows[name]["figures"] = figures(name, folder)
    machine = {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__}
    for row in rows.values():
        row["commit"] = _commit()
    if args.shapes and RESULTS.is_file():  # a re-run of some shapes: the others are kept
        earlier = json.loads(RESULTS.read_text())
        if earlier["machine"] != machine:
            raise SystemExit(f"{RESULTS} was measured on {earlier['machine']}; re-run all")
        rows = {**earlier["shapes"], **rows}
    tracebacks = [f"{n} {c}" for n, row in rows.items() for c, r in row.items()
                  if isinstance(r, dict) and c != "figures"
                  and (r["traceback"] or r["rc"] not in (0, 2))]
    record = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "failures": tracebacks, "shapes": rows}
    if not args.quick:
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(tracebacks)} commands failed with a traceback or an exit other than 0/2: "
          f"{tracebacks}")


if __name__ == "__main__":
    main()
