"""Memory estimate before training: what a step of this plan holds, against what the device has.

A probe trains a fresh copy of the model for two real steps of the plan, eagerly: the first
creates the optimizer's states and is not counted; the second is tracked tensor by tensor by
torch's `MemTracker`, which sorts every live storage into parameters, buffers, gradients,
activations, optimizer states and temporaries, on any device. Two moments are kept: the peak
up to the optimizer step (forward and backward: activations held for backward, gradients
arriving) and the peak of the whole step (the optimizer's temporaries). What grows with the
micro-batch (activations, temporaries and the batch at the forward/backward peak) gives the
largest micro-batch that fits and the saving of a smaller one.

Each option is priced from this breakdown: a smaller micro-batch (gradient accumulation keeps
the global batch), activation checkpointing (measured by a second probe with it on), 8-bit or
4-bit Adam states (torchao's layout: 1 or 1/2 byte per value plus an fp32 scale per block, for
tensors of at least 4096 values), and FSDP2 across N GPUs (weights, gradients and states
sharded N ways). For a launch (`Layout`: N ranks under DDP or FSDP2, hybrid or not) it prices
each rank: its share of the training step, what each rank writes at a checkpoint and holds
besides at a save (the async staging copy) and a resume, and rank 0's gathered weights at the
end; "fits" is then the rank's. Not counted: the CUDA context and the caching allocator's
slack on a GPU, the interpreter and libraries on a CPU; the fit check leaves `MARGIN` for
them, as the batch-size finder does. A compiled plan is probed eagerly (compiled kernels
usually hold less).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import TrainConfig, config_from_dict, merge
from ..data import DataBundle
from ..data.batching import first_batch
from ..data.streams import is_stream
from ..measure.memory import MARGIN, available_ram_bytes, cuda_memory_bytes
from ..run.plan import Run, build
from ..run.step import OneBatch, metrics
from ..run.trainer import Trainer
from ..techniques import checkpointing, optimizer_offload, optimizer_states
from ..techniques.base import Context

log = logging.getLogger(__name__)

LOW_BIT = {"8bit": (1.0, 256), "4bit": (0.5, 128)}  # torchao: bytes per value, block size
QUANTIZED_MIN = 4096  # torchao quantizes state tensors of at least this many values
MAX_SHARDS = 64
_KINDS = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients",
          "Activation": "activations", "Temp": "temporaries", "Optstate": "optimizer_states",
          "Other": "other"}
_PER_SAMPLE = ("activations", "temporaries", "other")  # what grows with the micro-batch
_SHARDED = ("parameters", "gradients", "optimizer_states")  # what FSDP2 divides


@dataclass
class MemoryEstimate:
    device: str
    micro_batch: int  # samples per forward/backward
    forward_backward: dict[str, int]  # bytes by kind at the peak up to the optimizer step
    optimizer_step: dict[str, int]  # bytes by kind at the optimizer step's own peak
    evaluation: dict[str, int]  # bytes by kind at an evaluation batch's peak (no gradients)
    eval_batch: int  # samples per evaluation batch (data.eval_batch_size)
    peak_bytes: int
    peak_phase: str
    bytes_per_sample: float
    room_bytes: int | None
    room_kind: str
    fits: bool | None
    largest_micro_batch: int | None
    options: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_rank: dict[str, Any] | None = None  # for a launch (`Layout`): what each rank holds
    forward_end_activations: int = 0  # activations when a micro-batch's forward ends

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peak_at(self, micro_batch: int, saved: Callable[[dict[str, int]], float] | None = None,
                saved_per_sample: float = 0.0) -> int:
        """The step's peak with `micro_batch` samples, less what an option saves at each of
        the two peaks (`saved(bytes by kind)`) and per sample."""
        saved = saved or (lambda kinds: 0.0)
        fwbw = self.forward_backward
        fixed = fwbw["total"] - self.bytes_per_sample * self.micro_batch
        at_fwbw = fixed + (self.bytes_per_sample - saved_per_sample) * micro_batch - saved(fwbw)
        at_step = self.optimizer_step["total"] - saved(self.optimizer_step)
        at_eval = self.evaluation["total"] - saved(self.evaluation)
        return int(max(at_fwbw, at_step, at_eval))

    def pipeline_peak(self, layout: Layout) -> int:
        """A pipeline rank's peak: its share of the weights, states and (once a backward ran
        before its forwards peak: `gradients_held`) gradients, with the activations of its
        micro-batches in flight when the last of their forwards ends
        (one process's at one micro-batch, times its stages' share: `pipeline_ranks`) and
        its stages' largest temporaries; at the optimizer step and at evaluation, its share
        of one process's peaks."""
        fwbw, evaluation = self.forward_backward, self.evaluation
        held = fwbw["parameters"] + fwbw["optimizer_states"] + fwbw["buffers"] + \
            (fwbw["gradients"] if layout.gradients_held else 0)
        split = 1 - layout.split_activations * (1 - 1 / layout.tp)  # (tensor parallel's)
        at_fwbw = held * layout.kept + split * (
            self.forward_end_activations * layout.stage_activations +
            (fwbw["temporaries"] + fwbw["other"]) * layout.stage_share)
        at_step = self.optimizer_step["total"] * layout.kept
        at_eval = (sum(evaluation[k] for k in _SHARDED) + evaluation["buffers"]) * layout.kept \
            + sum(evaluation[k] for k in _PER_SAMPLE) * layout.stage_share
        return int(max(at_fwbw, at_step, at_eval))


@dataclass(frozen=True)
class Layout:
    """A launch to price per rank: `processes` ranks in all, DDP or FSDP2 (`replicas` hybrid
    copies of the model, each sharded over processes / replicas ranks), tensor parallel over
    `tp` of them, or pipeline stages over `pp` ("pp": each stage on one rank; "fsdp": each
    stage sharded over the processes / pp pipelines). A pipeline's rank is priced by its
    stage's shares (`pipeline_ranks`)."""

    processes: int
    strategy: str  # "ddp" | "fsdp" | "pp"
    replicas: int = 1
    async_save: bool = False
    tp: int = 1  # tensor-parallel degree
    split: float = 0.0  # share of the parameters' bytes in the layers tensor parallel splits
    split_activations: float = 0.0  # share of the activations' bytes it splits (measured)
    pp: int = 1  # pipeline stages (ranks of one pipeline)
    schedule: str = "1f1b"
    microbatches: int = 1
    rank: int = 0  # the pipeline rank priced
    stage_params: float = 1.0  # its share of the parameter bytes
    stage_share: float = 1.0  # its largest stage's share of one micro-batch's activations
    stage_activations: float = 1.0  # micro-batch activations held at once (in flight x share)
    gradients_held: bool = True  # a backward ran before its forwards peak (not GPipe)

    @property
    def shards(self) -> int:
        return self.processes // self.replicas // self.tp // self.pp \
            if self.strategy == "fsdp" else 1

    @property
    def kept(self) -> float:
        """The share of the weights (and of their gradients and states) a rank holds."""
        return (1 - self.split + self.split / self.tp) / self.shards * self.stage_params

    def saved(self, kinds: dict[str, int]) -> float:
        """Bytes a rank holds less than one process: FSDP2 shards the weights, gradients and
        states, tensor parallel splits its layers' and the activations between its split
        layers, a pipeline stage holds its own layers and the activations of the
        micro-batches in flight on it; DDP holds more, its gradient buckets (a second copy of
        the gradients)."""
        if self.strategy == "ddp":
            return -kinds["gradients"]
        split = self.split_activations * (1 - 1 / self.tp)
        staged = kinds["activations"] * (1 - self.stage_activations) + \
            (kinds["temporaries"] + kinds["other"]) * (1 - self.stage_share)
        return sum(kinds[k] for k in _SHARDED) * (1 - self.kept) + \
            sum(kinds[k] for k in _PER_SAMPLE) * split + staged

    def describe(self) -> str:
        if self.strategy == "ddp":
            return f"{self.processes} processes, DDP"
        hybrid = f"{self.replicas} copies x " if self.replicas > 1 else ""
        tensor = f", layers split over {self.tp}" if self.tp > 1 else ""
        if self.pp > 1:
            sharded = f", each FSDP2-sharded over {self.shards}" if self.strategy == "fsdp" \
                else ""
            return (f"{self.processes} processes, {self.pp} pipeline stages{tensor}{sharded} "
                    f"({self.schedule}, {self.microbatches} micro-batches; rank {self.rank} "
                    "holds the most)")
        if self.shards == 1 and self.replicas == 1 and self.tp > 1:
            return f"{self.processes} processes, layers split over {self.tp}"
        return f"{self.processes} processes, FSDP2 over {hybrid}{self.shards} shards{tensor}"


def per_rank(est: MemoryEstimate, layout: Layout, limit: float | None, gathered: int = 0
             ) -> dict[str, Any]:
    """What each rank of `layout` holds: training (its share of the step's peak, plus under
    FSDP2 the `gathered` bytes of whole blocks it all-gathers at once), what it
    writes at a checkpoint (DCP: its own shards; replicas written once) and holds besides at
    a save (an async save's staging copy of its state; a synchronous one writes from the
    tensors) and at a resume (read into the tensors), and rank 0 at the end (the full weights
    gathered on the host for model.pt, the optimizer not)."""
    fwbw = est.forward_backward
    state = fwbw["parameters"] + fwbw["optimizer_states"]
    split = 1 - layout.split + layout.split / layout.tp  # (of a block's weights, under tp)
    training = (est.pipeline_peak(layout) if layout.pp > 1 else
                est.peak_at(est.micro_batch, layout.saved)) + \
        (int(gathered * split) if layout.strategy == "fsdp" else 0)
    return {"layout": layout.describe(), "processes": layout.processes,
            "shards": layout.shards, "replicas": layout.replicas, "tp": layout.tp,
            "pp": layout.pp,
            "split_activations": layout.split_activations,
            "training_peak_bytes": training,
            "fits": None if limit is None else training <= limit,
            "checkpoint_bytes": int(state / layout.processes),
            "at_save_bytes": int(state * layout.kept) if layout.async_save else 0,
            "at_resume_bytes": 0, "rank0_at_end_bytes": fwbw["parameters"]}


def pipeline_ranks(run: Run, layout: Layout) -> tuple[list[Layout], int]:
    """(`layout` for each rank of one pipeline, the bytes a stage sends the next per
    micro-batch): the parameter bytes its stages hold, and the activations it holds at
    once, as shares of one process's (`pipeline.stage_shares`, on one batch) times the
    micro-batches in flight on it (`pipeline.in_flight`)."""
    from .. import pipeline

    pipeline.check(run.model, layout.pp, layout.schedule, layout.microbatches)
    per = pipeline.stages_per_rank(layout.schedule)
    stages = layout.pp * per
    shares = pipeline.stage_shares(
        run.model, lambda m: metrics(m, OneBatch(first_batch(run.train_loader)), run.step),
        stages)
    params, produced = shares.params, shares.produced
    ranks = []
    for rank in range(layout.pp):
        mine = range(rank, stages, layout.pp)
        flight = pipeline.in_flight(layout.schedule, layout.pp, rank, layout.microbatches)
        ranks.append(replace(
            layout, rank=rank, stage_params=sum(params[s] for s in mine),
            stage_share=max(produced[s] for s in mine),
            stage_activations=flight * sum(produced[s] for s in mine) / per,
            gradients_held=flight < layout.microbatches * per))
    return ranks, shares.sent


def activations_split(run: Run, tp: int) -> float:
    """The share of a forward's activations that tensor parallel splits (`_tp_activations`)."""
    return _tp_activations(run, tp)[0]


def _tp_activations(run: Run, tp: int) -> tuple[float, int]:
    """(the share of a forward's activations tensor parallel splits, the bytes its ranks
    all-reduce per micro-batch), from the bytes each layer produces on one batch: the outputs
    of the column-split layers (q, k, v, the MLP's up and gate channels) and the inputs of
    the row-split ones (the attention's output, the MLP's hidden channels) are split `tp`
    ways; every other layer's output (norms, the residual stream, the gathered logits) is
    whole on each rank. A row-split layer's output is all-reduced in the forward, and as
    much again in the backward (the column-split layers' input gradients)."""
    from ..tensor_parallel import layer_plan

    plan, sizes = layer_plan(run.model, tp), {"split": 0, "whole": 0, "reduced": 0}

    def nbytes(value) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(value))

    def record(name: str):
        def hook(module, inputs, output) -> None:
            style = plan.get(name, "")
            if style == "colwise":
                sizes["split"] += nbytes(output)
            elif style == "rowwise":
                sizes["split"] += nbytes(inputs)
                sizes["whole"] += nbytes(output)
                sizes["reduced"] += 2 * nbytes(output)
            elif not any(True for _ in module.children()):
                sizes["whole"] += nbytes(output)
                sizes["reduced"] += nbytes(output) if style == "embedding_rowwise" else 0
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in run.model.named_modules()]
    try:
        metrics(run.model, OneBatch(first_batch(run.train_loader)), run.step)
    finally:
        for hook in hooks:
            hook.remove()
    total = sizes["split"] + sizes["whole"]
    return (sizes["split"] / total if total else 0.0), sizes["reduced"]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [t for v in getattr(value, "values", lambda: [])() for t in _tensors(v)] \
        if hasattr(value, "keys") else []


def gathered_bytes(model: nn.Module) -> int:
    """FSDP2 holds a block's whole weights while it computes and prefetches the next one's:
    twice the largest block's, at the plan's parameter dtype."""
    sizes = [sum(p.numel() * p.element_size() for p in block.parameters())
             for block in distributed.blocks(model)]
    return 2 * max(sizes, default=0)


def device_room(device: torch.device) -> tuple[int | None, str]:
    """What tensors may grow to: a GPU's memory, or a CPU's available RAM."""
    if device.type == "cuda":
        return cuda_memory_bytes(device), "CUDA device memory (total)"
    if device.type == "cpu":
        avail = available_ram_bytes()
        return avail, "the machine's available RAM" if avail else "unknown (no /proc)"
    return None, f"unknown on {device.type}"


def _by_kind(snapshot: dict, device: torch.device) -> dict[str, int]:
    per_device = {torch.device(d): s for d, s in snapshot.items()}
    mine = per_device.get(device) or per_device.get(torch.device(device.type)) or {}
    out = {name: 0 for name in _KINDS.values()}
    for key, value in mine.items():
        label = getattr(key, "value", key)
        if label in _KINDS:
            out[_KINDS[label]] = int(value)
    out["total"] = sum(out.values())
    return out


def _probe_run(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
               changes: dict[str, Any]) -> Run:
    eager = merge(cfg.to_dict(), {"plan": {"compile": False}})
    return build(config_from_dict(merge(eager, changes)), build_model(), bundle.train,
                 bundle.val, measure_loader=False, collate_fn=bundle.collate_fn)


class _NoHook:
    def remove(self) -> None:
        pass


def _tracker(model: nn.Module):
    """torch's MemTracker, told not to hook the gradients of frozen parameters.

    Its module hooks register a gradient hook on every parameter a forward touches, and torch
    refuses one on a tensor that needs no gradient: every LoRA/PEFT model (a frozen base) and
    Whisper (frozen positions) failed. A frozen parameter is a weight with no gradient and no
    optimizer state, which is what the tracker then counts it as."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    hooks = getattr(tracker, "_param_to_grad_hook_handles", None)
    if hooks is not None:  # (where torch renames it, a frozen model fails as before)
        for param in model.parameters():
            if not param.requires_grad:
                hooks[param] = (_NoHook(), _NoHook())
    return tracker


@contextlib.contextmanager
def _tracker_quiet():
    """MemTracker's module hooks warn where they cannot follow the modules (one a checkpoint
    recomputes: "Module is None"; calls it cannot pair: "hierarchy tracking maybe be messed
    up", 4 lines on every doctor of a stock Llama): the peaks used here are the tensors',
    not its per-module figures, so the user is not told."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Module is None", UserWarning)
        warnings.filterwarnings("ignore", "The module hierarchy tracking", UserWarning)
        yield


def probe(run: Run) -> tuple[dict[str, int], dict[str, int], int]:
    """(bytes by kind at the forward/backward peak, at the optimizer step's peak, micro-batch)."""
    return _probe(run)[:3]


def _evaluation(run: Run, optimizer) -> dict[str, int]:
    """Bytes by kind while the first validation batch is evaluated as `metrics` evaluates it,
    with the optimizer's states alive, as they are at every evaluation. A language model's
    logits over a large vocabulary at data.eval_batch_size can outgrow the training step."""
    raw = first_batch(run.val_loader, "validation")
    tracker = _tracker(run.model)
    tracker.track_external(run.model, optimizer)
    with tracker, _tracker_quiet():
        metrics(run.model, OneBatch(raw), run.step)
    return _by_kind(tracker.get_tracker_snapshot("peak"), run.plan.device)


def _probe(run: Run) -> tuple[dict[str, int], dict[str, int], int, dict[str, int], int]:
    """`probe`'s answer, the evaluation's bytes by kind and the activations' bytes when the
    forward ended (a pipeline's ranks hold several micro-batches' at once). MemTracker
    follows one forward per step (it refuses a module called again before the step ends,
    and doctor with plan.grad_accum=4 was a traceback), so the probe steps at every
    micro-batch; under accumulation the gradients are alive through every micro-batch after
    the first, and are added to the forward and backward's peak."""
    fwbw, in_step, micro, evaluation, forward_end = _probe_each_micro_batch(
        replace(run, plan=replace(run.plan, grad_accum=1)))
    if run.plan.grad_accum > 1 and in_step["gradients"] > fwbw["gradients"]:
        fwbw = {**fwbw, "gradients": in_step["gradients"],
                "total": fwbw["total"] - fwbw["gradients"] + in_step["gradients"]}
    return fwbw, in_step, micro, evaluation, forward_end


def _probe_each_micro_batch(run: Run
                            ) -> tuple[dict[str, int], dict[str, int], int, dict[str, int], int]:
    trainer = Trainer(run, progress_bar=False)
    steps = trainer.steps()
    try:
        next(steps)  # creates the optimizer's states: not what a step holds afterwards
        optimizer = trainer.state.optimizer
        tracker, in_step, seen = _tracker(run.model), _tracker(run.model), {}
        if run.plan.optimizer_offload:  # states and step on the host: the model's side only
            tracker.track_external(run.model)
            with tracker, _tracker_quiet():
                next(steps)
            return (*_tracked(tracker.get_tracker_snapshot("peak"), None, run, trainer),
                    _evaluation(run, None), 0)
        tracker.track_external(run.model, optimizer)

        def before_step(*_) -> None:  # forward and backward are over: their peak is known
            seen["fwbw"] = tracker.get_tracker_snapshot("peak")
            in_step.track_external(run.model, optimizer)
            in_step.__enter__()

        def after_step(*_) -> None:
            in_step.__exit__(None, None, None)
            seen["step"] = in_step.get_tracker_snapshot("peak")

        def forward_ended(*_) -> None:  # (the activations' most: backward frees them)
            seen["forward_end"] = tracker.get_tracker_snapshot()

        hooks = [optimizer.register_step_pre_hook(before_step),
                 optimizer.register_step_post_hook(after_step),
                 run.model.register_forward_hook(forward_ended)]
        try:
            with tracker, _tracker_quiet():
                next(steps)
        finally:
            for hook in hooks:
                hook.remove()
        evaluation = _evaluation(run, optimizer)
    finally:
        steps.close()
    forward_end = _by_kind(seen["forward_end"], run.plan.device)["activations"] \
        if "forward_end" in seen else 0
    return (*_tracked(seen.get("fwbw", tracker.get_tracker_snapshot("peak")), seen.get("step"),
                      run, trainer), evaluation, forward_end)


def _tracked(fwbw: dict, in_step: dict | None, run: Run, trainer: Trainer
             ) -> tuple[dict[str, int], dict[str, int], int]:
    """The probe's answer; without a step peak of its own (a GradScaler skipped the step of
    overflowing gradients, or the step ran on the host) the step counts as the first peak."""
    device = run.plan.device
    micro = max(run.cfg.data.batch_size // trainer.state.progress.micro_split, 1)
    return _by_kind(fwbw, device), _by_kind(in_step or fwbw, device), micro


def estimate(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
             room: int | None = None, shards_available: int | None = None,
             layout: Layout | None = None) -> MemoryEstimate:
    """Probe the plan and price the options; `room` overrides the device's memory (bytes);
    with a `layout`, each of its ranks is priced and "fits" is a rank's."""
    run = _probe_run(build_model, bundle, cfg, {})
    fwbw, in_step, micro, evaluation, forward_end = _probe(run)
    device = run.plan.device
    room, kind = (room, "given limit") if room else device_room(device)
    per_sample = sum(fwbw[k] for k in _PER_SAMPLE) / micro
    phases = {"forward/backward": fwbw["total"], "optimizer step": in_step["total"],
              "evaluation": evaluation["total"]}
    est = MemoryEstimate(
        device=str(device), micro_batch=micro, forward_backward=fwbw, optimizer_step=in_step,
        evaluation=evaluation, eval_batch=cfg.data.eval_batch_size if is_stream(bundle.val)
        else min(cfg.data.eval_batch_size, len(bundle.val)),
        peak_bytes=max(phases.values()), peak_phase=max(phases, key=phases.get),
        bytes_per_sample=per_sample, room_bytes=room, room_kind=kind, fits=None,
        largest_micro_batch=None, forward_end_activations=forward_end)
    limit = None if room is None else (1 - MARGIN) * room
    if limit is not None:
        est.fits = est.peak_bytes <= limit
        est.largest_micro_batch = _largest_micro_batch(est, limit)
    if layout is not None:
        if layout.tp > 1 and layout.split > 0:  # (the model's own plan, known here)
            layout = replace(layout, split_activations=activations_split(run, layout.tp))
        if layout.pp > 1:  # (the rank that holds the most)
            rows = [(per_rank(est, r, limit, gathered_bytes(run.model)), r)
                    for r in pipeline_ranks(run, layout)[0]]
            (est.per_rank, layout) = max(rows, key=lambda row: row[0]["training_peak_bytes"])
            est.per_rank["stage_peak_bytes"] = [row["training_peak_bytes"] for row, _ in rows]
        else:
            est.per_rank = per_rank(est, layout, limit, gathered_bytes(run.model))
        if limit is not None:  # (less the whole blocks FSDP2 gathers, which no batch shrinks)
            gathered = est.per_rank["training_peak_bytes"] - \
                est.peak_at(est.micro_batch, layout.saved)
            est.fits = est.per_rank["fits"]
            est.largest_micro_batch = _largest_micro_batch(est, limit - gathered,
                                                           layout.saved)
    est.options = _options(est, run, build_model, bundle, cfg, limit, shards_available)
    if cfg.plan.compile is not False:
        est.notes.append("probed eagerly: compiled kernels usually hold less")
    return est


def _largest_micro_batch(est: MemoryEstimate, limit: float, saved=None) -> int | None:
    """The largest micro-batch whose step fits `limit`, less what `saved(bytes by kind)`
    says a rank holds less."""
    if est.bytes_per_sample <= 0:
        return None
    saved = saved or (lambda kinds: 0.0)
    fwbw = est.forward_backward
    fixed = fwbw["total"] - est.bytes_per_sample * est.micro_batch - saved(fwbw)
    if max(fixed, est.optimizer_step["total"] - saved(est.optimizer_step)) > limit:
        return 0
    return int((limit - fixed) // est.bytes_per_sample)


def low_bit_state_bytes(model: nn.Module, states: str) -> int:
    """Adam's two moments in torchao's low-bit layout (smaller tensors stay fp32)."""
    per_value, block = LOW_BIT[states]
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n = p.numel()
        quantized = n >= QUANTIZED_MIN and n % block == 0
        total += 2 * (n * per_value + n // block * 4 if quantized else n * 4)
    return int(total)


def _option(est: MemoryEstimate, limit: float | None, advice: str, saved=None,
            saved_per_sample: float = 0.0, micro: int | None = None,
            measured: bool = False) -> dict[str, Any]:
    peak = est.peak_at(micro or est.micro_batch, saved, saved_per_sample)
    return {"advice": advice, "peak_bytes": peak, "saves_bytes": est.peak_bytes - peak,
            "fits": None if limit is None else peak <= limit, "measured": measured}


def _options(est: MemoryEstimate, run: Run, build_model, bundle: DataBundle, cfg: TrainConfig,
             limit: float | None, shards_available: int | None) -> list[dict[str, Any]]:
    """What each way of holding less would bring, for the plan's own settings."""
    plan, opts = run.plan, []
    if est.micro_batch > 1:
        opts.append(_micro_batch_option(est, cfg, plan.grad_accum, limit))
    if est.peak_phase == "evaluation" and est.eval_batch > 1:
        opts.append(_eval_batch_option(est, limit))
    ckpt = _checkpointing_saving(est, run, build_model, bundle, cfg)
    if ckpt is not None:
        opts.append(_option(est, limit, "activation checkpointing "
                                        "(plan.activation_checkpointing=true)",
                            saved_per_sample=ckpt, measured=True))
    if cfg.optim.name in optimizer_states.ADAM_FAMILY and plan.optimizer_states == "fp32":
        opts += _state_options(est, run.model, cfg.optim.name, limit)
    offload = Context(plan.device, run.model, cfg.optim.name, plan.distributed,
                      clip_norm=cfg.train.clip_norm)
    if plan.device.type == "cuda" and optimizer_offload.check(offload)[0] \
            and not plan.optimizer_offload and plan.optimizer_states == "fp32":
        opts.append(_option(est, limit, "optimizer states on the CPU (plan.optimizer_offload="
                                        "true; slower steps)",
                            saved=lambda kinds: kinds["optimizer_states"]))
    if plan.distributed != "fsdp" and (plan.device.type == "cuda" or est.fits is False):
        opts.append(_fsdp_option(est, limit, shards_available))
        for option in (_tensor_parallel_option(est, run, limit, shards_available),
                       _pipeline_option(est, run, limit, shards_available, plan.grad_accum)):
            opts += [option] if option is not None else []
    return opts


def _micro_batch_option(est: MemoryEstimate, cfg: TrainConfig, grad_accum: int,
                        limit: float | None) -> dict[str, Any]:
    """The largest micro-batch that fits (half the current one when it already fits), with
    the accumulation that keeps the global batch."""
    micro = est.largest_micro_batch if est.fits is False and est.largest_micro_batch \
        else max(est.micro_batch // 2, 1)
    accum = -(-cfg.data.batch_size * grad_accum // micro)
    return _option(est, limit, f"micro-batches of {micro} (data.batch_size={micro}, "
                               f"plan.grad_accum={accum} keeps the global batch)", micro=micro)


def _eval_batch_option(est: MemoryEstimate, limit: float | None) -> dict[str, Any]:
    """Evaluating in smaller batches: the evaluation's activations shrink with its batch (the
    training step's peak is then what remains)."""
    evaluation = est.evaluation
    per_sample = sum(evaluation[k] for k in _PER_SAMPLE) / est.eval_batch
    size = est.eval_batch // 2
    while limit is not None and size > 1 and \
            evaluation["total"] - per_sample * (est.eval_batch - size) > limit:
        size //= 2
    saved = per_sample * (est.eval_batch - size)
    trained = est.peak_at(est.micro_batch, lambda kinds: saved if kinds is evaluation else 0.0)
    return {"advice": f"evaluation in batches of {size} (data.eval_batch_size={size}; it "
                      "changes no result)", "peak_bytes": trained,
            "saves_bytes": est.peak_bytes - trained,
            "fits": None if limit is None else trained <= limit, "measured": False}


def _state_options(est: MemoryEstimate, model: nn.Module, optimizer: str,
                   limit: float | None) -> list[dict[str, Any]]:
    """Low-bit moments (torchao's layout) and, for AdamW, bf16 weights and moments (half of
    the weights', gradients' and moments' bytes)."""
    states = est.forward_backward["optimizer_states"]
    opts = []
    for bits in LOW_BIT:
        saved = max(states - low_bit_state_bytes(model, bits), 0)
        opts.append(_option(est, limit, f"{bits} Adam states (plan.optimizer_states={bits}, "
                                        "lossy)", saved=lambda kinds, s=saved: s))
    if optimizer == "adamw":
        opts.append(_option(est, limit, "bf16 weights and states (plan.optimizer_states=bf16, "
                                        "lossy)",
                            saved=lambda kinds: sum(kinds[k] for k in _SHARDED) / 2))
    return opts


def _checkpointing_saving(est: MemoryEstimate, run: Run, build_model, bundle: DataBundle,
                          cfg: TrainConfig) -> float | None:
    """Per-sample bytes that activation checkpointing saves, from a second probe with it on."""
    if run.plan.activation_checkpointing or checkpointing.users_checkpointing(run.model):
        return None  # already on (the plan's, or the user's own): nothing more to save
    ok, why = checkpointing.check(Context(run.plan.device, run.model, cfg.optim.name))
    if not ok:
        log.info("memory estimate: activation checkpointing not priced: %s", why)
        return None
    fwbw, _, micro = probe(_probe_run(build_model, bundle, cfg,
                                      {"plan": {"activation_checkpointing": True}}))
    with_ckpt = sum(fwbw[k] for k in _PER_SAMPLE) / micro
    return max(est.bytes_per_sample - with_ckpt, 0.0)


def _fsdp_option(est: MemoryEstimate, limit: float | None, shards_available: int | None
                 ) -> dict[str, Any]:
    """FSDP2: weights, gradients and optimizer states sharded across N GPUs (the smallest
    power of two that fits)."""
    def sharding(n: int):
        return lambda kinds: sum(kinds[k] for k in _SHARDED) * (1 - 1 / n)

    shards = 2
    while limit is not None and shards < MAX_SHARDS and \
            est.peak_at(est.micro_batch, sharding(shards)) > limit:
        shards *= 2
    option = _option(est, limit, f"FSDP2 across {shards} GPUs (leantrain launch --nproc "
                                 f"{shards}, plan.distributed=fsdp)", saved=sharding(shards))
    if shards_available is not None and shards > shards_available:
        option["advice"] += f"; this machine has {shards_available}"
    return option


def _tensor_parallel_option(est: MemoryEstimate, run: Run, limit: float | None,
                            available: int | None) -> dict[str, Any] | None:
    """Tensor parallel over N GPUs of one node, for a model with a plan: the smallest N (2,
    4, 8, as its heads allow) whose rank fits, and the activations each rank all-reduces per
    micro-batch, the price of splitting layers (fast links: NVLink)."""
    from ..errors import LeantrainError
    from ..tensor_parallel import hf_plan, layer_plan, split_share

    if not hf_plan(run.model):
        return None
    chosen = None
    for n in (2, 4, 8):
        try:
            layer_plan(run.model, n)
        except LeantrainError:
            break
        share, reduced = _tp_activations(run, n)
        layout = Layout(n, "fsdp", tp=n, split=split_share(run.model, n),
                        split_activations=share)
        peak = per_rank(est, layout, limit, gathered_bytes(run.model))["training_peak_bytes"]
        chosen = (n, peak, reduced)
        if limit is None or peak <= limit:
            break
    if chosen is None:
        return None
    n, peak, reduced = chosen
    advice = (f"tensor parallel over {n} GPUs of one node (leantrain launch --nproc {n} -- "
              f"train --set plan.parallel.tp={n}, the model's plan; each rank all-reduces "
              f"{reduced / 2**20:,.1f} MiB of activations per micro-batch)")
    return _parallel_option(est, advice, peak, limit, n, available)


def _parallel_option(est: MemoryEstimate, advice: str, peak: int, limit: float | None,
                     n: int, available: int | None) -> dict[str, Any]:
    """A model-parallel option over `n` GPUs, priced at `peak` per rank (not measured)."""
    if available is not None and n > available:
        advice += f"; this machine has {available}"
    return {"advice": advice, "peak_bytes": peak, "saves_bytes": est.peak_bytes - peak,
            "fits": None if limit is None else peak <= limit, "measured": False}


def _pipeline_option(est: MemoryEstimate, run: Run, limit: float | None,
                     available: int | None, grad_accum: int) -> dict[str, Any] | None:
    """Pipeline stages over N GPUs, for a model with one list of blocks: the smallest N (2,
    4, 8, up to its blocks) whose fullest rank fits under 1F1B with max(N, plan.grad_accum)
    micro-batches, and the activation each stage sends the next per micro-batch (and its
    gradient back), the price of cutting the model: small enough to cross nodes."""
    from .. import pipeline
    from ..errors import LeantrainError

    try:
        blocks = len(pipeline.block_list(run.model)[2])
    except LeantrainError:
        return None
    chosen = None
    for n in (2, 4, 8):
        if n > blocks:
            break
        microbatches = max(n, grad_accum)
        ranks, sent = pipeline_ranks(run, Layout(n, "pp", pp=n, microbatches=microbatches))
        chosen = (n, microbatches, max(est.pipeline_peak(r) for r in ranks), sent)
        if limit is None or chosen[2] <= limit:
            break
    if chosen is None:
        return None
    n, microbatches, peak, sent = chosen
    advice = (f"pipeline stages over {n} GPUs (leantrain launch --nproc {n} -- train --set "
              f"plan.parallel.pp={n} --set plan.grad_accum={microbatches}; each stage sends "
              f"{sent / 2**20:,.2f} MiB of activations per micro-batch, and as much back)")
    return _parallel_option(est, advice, peak, limit, n, available)


def format_estimate(est: dict[str, Any]) -> list[str]:
    """The estimate's lines for doctor and find-batch-size."""
    def mib(b: float) -> str:
        return f"{b / 2**20:,.1f} MiB"

    fb = est["forward_backward"]
    parts = " + ".join(f"{name.replace('_', ' ')} {mib(fb[name])}" for name in
                       ("parameters", "buffers", "gradients", "optimizer_states",
                        "activations", "temporaries", "other") if fb[name])
    lines = [f"memory estimate (one probe step, micro-batch {est['micro_batch']}): peak "
             f"{mib(est['peak_bytes'])} in the {est['peak_phase']}",
             f"  at the forward/backward peak: {parts}",
             f"  grows by {mib(est['bytes_per_sample'])} per sample of micro-batch"]
    if est.get("evaluation"):
        lines.append(f"  evaluating a batch of {est['eval_batch']}: "
                     f"{mib(est['evaluation']['total'])}")
    if est["room_bytes"]:
        verdict = "fits" if est["fits"] else "does NOT fit"
        largest = est["largest_micro_batch"]
        lines.append(f"  {verdict} in {mib(est['room_bytes'])} ({est['room_kind']}, "
                     f"{MARGIN:.0%} kept free); largest micro-batch that fits: "
                     f"{'any' if largest is None else f'{largest:,}'}")
    for o in est["options"]:
        fits = "" if o["fits"] is None else ("  fits" if o["fits"] else "  does not fit")
        how = "measured" if o["measured"] else "computed"
        lines.append(f"  option: {o['advice']}: peak {mib(o['peak_bytes'])} "
                     f"({mib(o['saves_bytes'])} less, {how}){fits}")
    if est.get("per_rank"):
        rank = est["per_rank"]
        fits = "" if rank["fits"] is None else (" (fits)" if rank["fits"] else
                                                " (does NOT fit)")
        save = f"+{mib(rank['at_save_bytes'])} (async staging copy)" if rank["at_save_bytes"] \
            else "+0 (written from the tensors)"
        lines += [f"  per rank ({rank['layout']}): training peak "
                  f"{mib(rank['training_peak_bytes'])}{fits}",
                  f"    a checkpoint writes {mib(rank['checkpoint_bytes'])} per rank; at a save "
                  f"{save}, at a resume +0 (read into the tensors); at the end rank 0 gathers "
                  f"the weights for model.pt: +{mib(rank['rank0_at_end_bytes'])} on the host"]
    lines += [f"  note: {n}" for n in est["notes"]]
    return lines
