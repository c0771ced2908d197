"""`leantrain doctor`: what this machine has, where a model's step time goes, what to try.

It states the machine's facts (versions, GPUs, precision support, CPU and SIMD, whether
`torch.compile` really works here, distributed backends), then trains the given model for a
few steps: unprofiled steps give samples/s, the step-time breakdown and MFU; profiled steps
give the top operators and a Chrome trace. Recommendations are ranked: those backed by a
measurement of this run first (largest share of step time first), then those that are only
likely to help, marked unmeasured, with the command that would measure them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TrainConfig, config_from_dict, merge
from ..data import DataBundle
from ..data.batching import data_wait_advice
from ..env import bf16_supported, compiler_available, machine_facts
from ..measure.compile_watch import break_even_steps, describe
from ..measure.load import busy_line
from ..measure.profile import profile_steps
from ..measure.timing import DATA_WAIT_WARNING, timed_window
from ..run import summary
from ..run.plan import Run, build
from ..run.trainer import Trainer
from ..techniques.memory_format import has_conv2d
from .memory_estimate import MARGIN, Layout, MemoryEstimate, estimate, format_estimate

WARMUP_STEPS = 3
OPTIMIZER_SHARE = 0.15  # an optimizer phase above this share of the step is worth fusing
LOW_MFU = 0.10


@dataclass
class Recommendation:
    advice: str
    evidence: str
    measured: bool
    share: float = 0.0  # of step time, for measured ones: the ranking key

    def describe(self) -> str:
        return f"[{'measured' if self.measured else 'unmeasured'}] {self.advice} ({self.evidence})"


def _timed_steps(trainer: Trainer, steps, n: int) -> dict[str, Any]:
    """Samples/s and the step-time breakdown over `n` steps after the warm-up ones (the
    warm-up's seconds are kept: for a compiled model they hold the compile)."""
    device = trainer.run.plan.device
    _, warmup_s = timed_window(lambda: next(steps)[0], device, lambda k, t: k >= WARMUP_STEPS)
    timer = trainer.restart_timer()
    samples, elapsed = timed_window(lambda: next(steps)[0], device, lambda k, t: k >= n)
    timer.finish()
    return {"samples_per_second": samples / elapsed, "steps": n,
            "step_breakdown": timer.breakdown(), "warmup_seconds": warmup_s}


def _compile_accounting(trainer: Trainer, measured: dict[str, Any], n: int,
                        eager_trainer: Trainer) -> dict[str, Any]:
    """For a compiled plan: what compiling did, and the steps at which it pays against the
    same plan run eagerly (timed here over as many steps)."""
    stats = trainer.compiling.close().to_dict()
    run = trainer.run
    samples_per_step = run.cfg.data.batch_size * run.plan.grad_accum
    compiled_s = samples_per_step / measured["samples_per_second"]
    compile_s = max(measured["warmup_seconds"] - WARMUP_STEPS * compiled_s, 0.0)
    eager = eager_trainer.steps()
    try:
        eager_s = samples_per_step / _timed_steps(eager_trainer, eager, n)["samples_per_second"]
    finally:
        eager.close()
    return {"seconds": compile_s, **stats, "eager_step_seconds": eager_s,
            "compiled_step_seconds": compiled_s,
            "break_even_steps": break_even_steps(compile_s, eager_s, compiled_s)}


def recommend(run: Run, measured: dict[str, Any], facts: dict[str, Any],
              memory: MemoryEstimate | None = None) -> list[Recommendation]:
    plan, model = run.plan, run.model
    recs: list[Recommendation] = []
    shares = (measured.get("step_breakdown") or {}).get("fractions", {})
    data = shares.get("data", 0.0)
    if data > DATA_WAIT_WARNING:
        advice = data_wait_advice(run.train_loader, plan.device, run.tensor_backed)
        recs.append(Recommendation(f"feed the model faster: {advice}",
                                   f"data wait is {data:.0%} of the step", True, data))
    opt = shares.get("optimizer", 0.0)
    if opt > OPTIMIZER_SHARE and plan.optimizer_impl != "fused":
        recs.append(Recommendation(
            "a fused or foreach optimizer (plan.optimizer_impl=fused or foreach)",
            f"the optimizer step is {opt:.0%} of the step with {plan.optimizer_impl}", True, opt))
    if plan.device.type == "cpu" and facts["gpus"]:
        recs.append(Recommendation("train on the GPU (plan.device=cuda)",
                                   f"{len(facts['gpus'])} GPU(s) here, the plan uses the CPU",
                                   False))
    if plan.precision == "fp32" and bf16_supported(plan.device)[0]:
        recs.append(Recommendation("bf16 autocast (plan.precision=bf16)",
                                   bf16_supported(plan.device)[1], False))
    if has_conv2d(model) and not plan.channels_last:
        recs.append(Recommendation("channels_last memory format (plan.channels_last=true)",
                                   "the model has 2-D convolutions", False))
    compile_ok = facts["compile"][0] if facts["compile"][0] is not None \
        else compiler_available()[0]
    if not plan.compile and compile_ok:
        recs.append(Recommendation("torch.compile (plan.compile=true)",
                                   f"it works here: {facts['compile'][1]}", False))
    mfu = measured.get("mfu")
    if plan.device.type == "cuda" and plan.compile and plan.compile_mode == "default" \
            and plan.distributed is None and mfu is not None and mfu < LOW_MFU:
        recs.append(Recommendation(
            "CUDA graphs (plan.compile_mode=reduce-overhead)",
            f"MFU is {mfu:.1%} with compiled kernels: launching many small kernels may be "
            "what bounds the step", False))
    if mfu is not None and mfu < LOW_MFU:
        recs.append(Recommendation(
            "a larger batch, if it fits (leantrain find-batch-size measures it)",
            f"MFU is {mfu:.1%}: the device is mostly idle or waiting on small kernels", False))
    if memory is not None:
        recs += memory_recommendations(memory)
    recs.sort(key=lambda r: (not r.measured, -r.share))
    return recs


def memory_recommendations(memory: MemoryEstimate) -> list[Recommendation]:
    """Where the plan does not fit the device: each option the estimate says would fit,
    cheapest in speed first as listed (a smaller micro-batch before recomputation)."""
    if memory.fits is not False:
        return []
    over = f"the estimated peak {memory.peak_bytes / 2**30:.2f} GiB is over " \
           f"{1 - MARGIN:.0%} of {memory.room_kind} ({memory.room_bytes / 2**30:.2f} GiB)"
    fitting = [o for o in memory.options if o["fits"]]
    if not fitting:
        return [Recommendation("none of the single options fits: combine them, or use a "
                               "device with more memory", over, True, 1.0)]
    return [Recommendation(o["advice"], f"{over}; with it {o['peak_bytes'] / 2**30:.2f} GiB",
                           True, 1.0) for o in fitting]


def run_doctor(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
               out: Path, steps: int = 20, profile: bool = True,
               check_compile: bool = True, layout: Layout | None = None) -> dict[str, Any]:
    facts = machine_facts(check_compile)
    run = build(cfg, build_model(), bundle.train, bundle.val, measure_loader=False,
                collate_fn=bundle.collate_fn)
    flops = summary.training_flops(run)
    trainer = Trainer(run, progress_bar=False)
    stepper = trainer.steps()
    try:
        measured = _timed_steps(trainer, stepper, steps)
        measured.update(summary.utilization(run.plan, flops, measured["samples_per_second"]))
        top_ops = None
        if profile:
            top_ops = profile_steps(lambda: next(stepper), steps, out / "trace.json",
                                    run.plan.device.type == "cuda")
    finally:
        stepper.close()
    if run.plan.compile:
        eager_cfg = config_from_dict(merge(cfg.to_dict(), {"plan": {"compile": False}}))
        eager = Trainer(build(eager_cfg, build_model(), bundle.train, bundle.val,
                              measure_loader=False, collate_fn=bundle.collate_fn),
                        progress_bar=False)
        measured["compile"] = _compile_accounting(trainer, measured, steps, eager)
    memory = estimate(build_model, bundle, cfg, shards_available=len(facts["gpus"]) or None,
                      layout=layout)
    recs = recommend(run, measured, facts, memory)
    return {
        "facts": facts,
        "plan": run.plan.to_dict(),
        "train_loader": run.train_loader.kind,
        "measured": measured,
        "memory": memory.to_dict(),
        "top_operators": top_ops,
        "trace": str(out / "trace.json") if profile else None,
        "recommendations": [asdict(r) | {"text": r.describe()} for r in recs],
    }


def _short(name: str, width: int = 100) -> str:
    """CUDA kernel names run to thousands of characters of templates (the JSON keeps them)."""
    return name if len(name) <= width else name[:width - 1] + "…"


def _fmt_gpu(gpu: dict) -> str:
    util = gpu["utilization_percent"]
    return (f"{gpu['name']}: {gpu['memory_gib']} GiB ({gpu['free_gib']} free), compute "
            f"capability {gpu['compute_capability']}, utilization "
            f"{'unknown' if util is None else f'{util}%'}")


_COMPILE_STATE = {True: "works", False: "unavailable", None: "not checked"}


def format_doctor(report: dict[str, Any]) -> str:
    f = report["facts"]
    cpu = f["cpu"]
    lines = ["machine", "-------",
             f"torch {f['torch']}, CUDA {f['cuda'] or 'none'}, cuDNN {f['cudnn'] or 'none'}"]
    lines += [f"GPU {g['index']}: {_fmt_gpu(g)}" for g in f["gpus"]] or [f["gpu_note"]]
    lines += [f"CPU: {cpu['model']}, {cpu['physical_cores']} cores / {cpu['logical_cores']} "
              f"threads (torch uses {cpu['torch_threads']}), SIMD {' '.join(cpu['simd'])}",
              f"RAM: {f['ram_gib']} GiB",
              "bf16: " + "; ".join(f"{k}: {v}" for k, v in f["bf16"].items()),
              f"TF32: {'yes' if f['tf32'] else 'no (needs an Ampere or newer GPU)'}",
              f"torch.compile: {_COMPILE_STATE[f['compile'][0]]} ({f['compile'][1]})",
              "distributed: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                          for k, v in f["distributed"].items())]
    m = report["measured"]
    lines += ["", "this model, this plan", "---------------------",
              f"loader: {report['train_loader']}",
              f"samples/s: {m['samples_per_second']:,.0f} over {m['steps']} unprofiled steps"]
    if m.get("step_breakdown"):
        lines.append("step time: " + " · ".join(
            f"{k} {v:.0%}" for k, v in m["step_breakdown"]["fractions"].items()))
    if m.get("mfu") is not None:
        lines.append(f"MFU: {m['mfu']:.1%} ({m['peak_source']})")
    if m.get("compile"):
        c = m["compile"]
        pays = "never pays: compiled steps are not faster" if c["break_even_steps"] is None \
            else f"pays after {c['break_even_steps']:,} steps"
        lines += [f"torch.compile: {c['seconds']:.1f} s to compile; {describe(c)}",
                  f"  {c['eager_step_seconds'] * 1e3:.2f} ms eager -> "
                  f"{c['compiled_step_seconds'] * 1e3:.2f} ms compiled per step; {pays}"]
    lines += format_estimate(report["memory"])
    if report["top_operators"]:
        lines += ["", "top operators (profiled steps, self time)"]
        lines += [f"  {op['share']:6.1%}  {op['self_ms']:9.2f} ms  {op['calls']:6d}x  "
                  f"{_short(op['name'])}" for op in report["top_operators"]]
        lines.append(f"trace: {report['trace']} (open in https://ui.perfetto.dev)")
    lines += ["", "recommendations (measured first)"]
    lines += [f"  {i}. {r['text']}" for i, r in enumerate(report["recommendations"], 1)] or \
        ["  none: nothing stands out"]
    lines.append("  `leantrain bench` measures every technique on this model")
    busy = busy_line(report.get("load"))
    if busy:
        lines.append(busy)
    return "\n".join(lines)
