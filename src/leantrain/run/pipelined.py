"""A run under pipeline parallelism: the plan's settings a pipeline cannot take yet, its
stages built from the run's own step (`pipeline.Pipeline`), and evaluation through them.

The stage's call is the run's step: the batch unpacked and the model called as one process
calls it, the loss the one it trains on (the model's own, the task's or the user's) and the
tallies the loop and validation sum, so a pipelined run reports what one process reports.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .. import distributed, pipeline, tensor_parallel
from ..config import PlanConfig
from ..data.loaders import batch_size, map_tensors
from ..errors import LeantrainError
from ..losses import tasks
from ..losses.outputs import read_output
from ..measure.probe import seeded, untouched
from ..techniques.base import Outcome
from . import state as run_state
from . import step

log = logging.getLogger(__name__)

# plan settings a pipeline stage does not run with yet: the value it takes instead on "auto"
_OFF = {"compile": False, "activation_checkpointing": False, "optimizer_offload": False}
_SCALED = ("fp16",)  # (a GradScaler's step would see one stage's gradients only)


def settle(cfg: PlanConfig, values: dict[str, Any], outcomes: list[Outcome],
           model: nn.Module, pp: int, data_world: int) -> None:
    """Checks the pipeline before any process trains (one line each) and turns off, with the
    reason in the summary, what "auto" chose that stages do not run with yet."""
    pipeline.check(model, pp, cfg.parallel.pp_schedule, values["grad_accum"])
    if cfg.parallel.pp_schedule == "interleaved-zero-bubble" and data_world > 1:
        # (FSDP2 would reduce and reshard after the input gradients, before the weights')
        raise LeantrainError("plan.parallel.pp_schedule=interleaved-zero-bubble with data "
                             "parallel stages is not built yet: use interleaved-1f1b")
    why = "not with pipeline parallel yet (plan.parallel.pp)"
    for name, off in _OFF.items():
        if values.get(name) != off:
            if getattr(cfg, name) is True:
                raise LeantrainError(f"plan.{name}=true: {why}")
            values[name] = off
            outcomes[:] = [Outcome(name, False, why) if o.name == name else o
                           for o in outcomes]
    chosen = values["precision"]
    if chosen in _SCALED or chosen.startswith("fp8"):
        if cfg.precision != "auto":
            raise LeantrainError(f"plan.precision={chosen}: {why}; use bf16 or fp32")
        # (a GPU that runs fp8 runs bf16; one that auto gave fp16 has no bf16)
        values["precision"] = "bf16" if chosen.startswith("fp8") else "fp32"
        kept = Outcome("precision", values["precision"] == "bf16",
                       f"{values['precision']}: {chosen} {why}")
        outcomes[:] = [kept if o.name == "precision" else o for o in outcomes]


def describe(model: nn.Module, parallel) -> str:
    stages = parallel.pp * pipeline.stages_per_rank(parallel.pp_schedule)
    sizes = [len(r) for r in pipeline.stage_ranges(len(pipeline.block_list(model)[2]), stages)]
    return f"{stages} stages of {'/'.join(map(str, sizes))} blocks"


def _train_call(contract: step.Step):
    def call(model: nn.Module, raw: Any) -> tuple[torch.Tensor, tuple]:
        sb = contract.unpack(raw)
        with step.naming_label_errors("a training batch"):
            logits, loss, _ = contract.forward(model, sb)
        metric, count = tasks.tally(contract.task, logits, sb.labels, sb.size)
        return loss, (loss.detach().float() * count, metric, count)  # (as the loop sums)
    return call


def build(model: nn.Module, contract: step.Step, first: Any, plan, dist) -> pipeline.Pipeline:
    """This process's stages, cut from `model` (in place) after a probe on the first batch;
    with several data-parallel ranks, each pipeline's stages are sharded over them (FSDP2,
    the blocks and the rest, as `distributed.wrap` shards a whole model)."""
    if contract.aux_terms:
        raise LeantrainError(f"plan.parallel.pp: the model's loss adds "
                             f"{', '.join(contract.aux_terms)} over every block (a router's "
                             "balance): the last stage sees its own blocks only; train it "
                             "with FSDP2 or tensor parallel instead")
    call = _train_call(contract)
    rows = _rows(first, 0, min(2, batch_size(first)))  # (the whole model runs once here)
    with untouched(model):
        roles = pipeline.find_roles(model, lambda m: call(m, rows)[0],
                                    plan.pp * pipeline.stages_per_rank(plan.pp_schedule))
        flops = _flops_per_sample(model, lambda: call(model, rows)[0].backward(),
                                  batch_size(rows))
    model.zero_grad(set_to_none=True)
    stages = pipeline.Pipeline(model, roles, plan.pp, dist.mesh["pp"].get_local_rank(),
                               plan.pp_schedule, plan.microbatches, plan.device, call,
                               dist.mesh["pp"].get_group(), distributed.pipelines(dist))
    if plan.tp > 1:  # the field's order: split the stage's layers, then shard them
        held = dict(model.named_modules())
        layers = {name: style for name, style in plan.tp_layers.items()
                  if name in held and any(True for _ in held[name].parameters(recurse=False))}
        tensor_parallel.apply(model, dist.mesh["tp"], layers, plan.tp_hook)
        stages.refresh()
    # each stage FSDP2-sharded over the data-parallel ranks; under tensor parallel over one
    # too (as without stages), so that every parameter is a DTensor the optimizer's one
    # kernel steps together with the split ones
    if dist.data_world > 1 or plan.tp > 1:
        distributed.wrap(model, "fsdp", plan.device, plan.precision, distributed.data_mesh(dist))
        stages.refresh()
    stages.flops_per_sample = flops
    return stages


def _flops_per_sample(model: nn.Module, forward_backward, rows: int) -> float | None:
    """The whole model's training FLOPs per sample, counted before it is cut into stages
    (MFU then divides a pipeline's rate over its processes)."""
    from ..measure.flops import count_flops

    try:
        return count_flops(forward_backward) / rows
    except Exception as exc:  # a model the counter cannot trace still trains
        log.warning("FLOPs not counted (%s: %s); no MFU for this run", type(exc).__name__, exc)
        return None


def forward_backward(run, state, timer, raw: Any, share: float) -> torch.Tensor:
    """The loop's forward and backward of one step's batch, through the schedule: the epoch's
    sums get the last stage's tallies, shared over the pipeline; returns the batch's mean
    loss. The step timer counts the schedule's time as forward (it interleaves both)."""
    if share != 1.0:  # (an out-of-memory replay in parts would scale the gradients twice)
        raise LeantrainError("out of memory under pipeline parallel: lower data.batch_size "
                             "(each micro-batch's samples), or raise plan.grad_accum with it")
    raw = _as_first_stage(run.pipeline, raw)
    timer.mark("copy")
    zeros = tasks.zeros(run.step.task, run.plan.device)
    loss_sum, metric, count = _from_last(run.pipeline, _summed(run.pipeline.train_step(raw),
                                                               zeros))
    loss = loss_sum / count.clamp(min=1)
    run_state.tally(state, loss, metric, count)
    timer.mark("forward")
    timer.mark("backward")
    return loss


def _as_first_stage(pipe: pipeline.Pipeline, raw: Any) -> Any:
    """The first stage's batch on every stage: a collate or dataset that draws random
    numbers (masking, crops) draws from each process's own stream, which the stages' own
    draws (dropout in different blocks) take apart; the inputs and the labels must be one
    batch. A small copy (token ids) per step."""
    import torch.distributed as dist

    held = [raw]
    dist.broadcast_object_list(held, group_src=0, group=pipe.group)
    return held[0]


def _summed(tallies: list[tuple], zeros: list[torch.Tensor]) -> list[torch.Tensor]:
    out = list(zeros)
    for tally in tallies:
        out = step.add_sums(out, tally)
    return out


def _from_last(pipe: pipeline.Pipeline, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last stage's sums, on every stage of the pipeline."""
    import torch.distributed as dist

    for v in values:
        dist.broadcast(v, group_src=pipe.last_rank, group=pipe.group)
    return values


def _eval_call(contract: step.Step):
    """The last stage's validation sums of a micro-batch, as `step.metrics` counts them."""
    def call(model: nn.Module, raw: Any) -> tuple[torch.Tensor, tuple]:
        sb = contract.unpack(raw)
        with contract.autocast():
            logits, own = read_output(model(*sb.args, **sb.kwargs))
        sums = step.batch_sums(contract, logits, own, sb)
        return sums[0], sums
    return call


@torch.no_grad()
def metrics(pipe: pipeline.Pipeline, loader, contract: step.Step) -> dict[str, float | None]:
    """`step.metrics` through the pipeline: each validation batch forward through the
    stages, as micro-batches of one size (`_even_parts`)."""
    model = pipe.model
    was_training, train_call = model.training, pipe.call
    model.eval()
    pipe.call = _eval_call(contract)
    totals = step.zero_sums(contract)
    try:
        with seeded(contract.device):
            for raw in loader.batches():
                for part, kept in _even_parts(raw, pipe.microbatches):
                    totals = _summed(pipe.eval_step(part)[:kept], totals)
    finally:
        pipe.call = train_call
        model.train(was_training)
    return step.found_metrics(contract, *_from_last(pipe, totals))


def _even_parts(raw: Any, micro: int) -> list[tuple[Any, int | None]]:
    """(part, micro-batches to count) that split into `micro` micro-batches of one size
    each: the batch's largest multiple of `micro` rows, then the rest padded with its last
    row to one row a micro-batch, of which the first `rest` count."""
    size = batch_size(raw)
    whole, rest = size - size % micro, size % micro
    parts = [(_rows(raw, 0, whole), None)] if whole else []
    if rest:
        tail = _rows(raw, whole, size)
        parts.append((_padded(tail, micro - rest), rest))
    return parts


def _rows(raw: Any, start: int, end: int) -> Any:
    return map_tensors(raw, lambda t: t[start:end])


def _padded(raw: Any, extra: int) -> Any:
    """`raw` with its last row repeated `extra` times."""
    return map_tensors(raw, lambda t: torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]))
