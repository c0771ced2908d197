"""Decide a run once: every "auto" of a config resolved, for this machine, model and data.

`build(cfg, model, train_data, val_data) -> Run` is the one place where a run's choices are
made: device and distributed context, each planned technique (the registry, through the
technique contract), the loaders (the DataLoader's "auto" settings measured on the real step),
accumulation and steps per epoch. The loop, the bench, the finders and doctor all read the
`Run`; none of them decides anything again.

Every technique ends up in the outcome list as applied, or not applied with the reason, so the
run summary tells the user exactly what was changed and why (no silent magic).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed, env, tensor_parallel
from ..config import PlanConfig, TrainConfig
from ..data.batching import batches_per_epoch, first_batch, make_loader
from ..data.fingerprint import fingerprint
from ..data.loaders import (
    LoaderOptions,
    batch_count,
    compute_threads,
    first_non_finite,
    labels_of,
    tensors_of,
)
from ..data.sources import check_datasets
from ..data.streams import is_stream
from ..data.tuning import LoaderTuning, tune_loader
from ..distributed import DistContext, rank_device
from ..errors import LeantrainError
from ..measure.probe import untouched
from ..techniques import PLANNED, cudnn_benchmark, loader, precision, tf32
from ..techniques.base import Context, Outcome
from ..techniques.checkpointing import apply_activation_checkpointing
from ..techniques.fused_cross_entropy import apply_fused_cross_entropy
from ..techniques.init import init_weights
from ..techniques.memory_format import apply_channels_last
from ..techniques.optimizer_states import apply_bf16_weights
from . import pipelined, step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def select_device(requested: str = "auto") -> DeviceChoice:
    """Pick the device to train on.

    "auto" prefers CUDA, then MPS, then CPU. On a multi-GPU host it takes the GPU with the most
    free memory, unless CUDA_VISIBLE_DEVICES is set: then the user chose, and the first visible
    GPU is used. An explicit request that this machine cannot honour is an error, not a fallback.
    """
    if requested == "auto":
        free = env.cuda_free_memory()
        if free:
            if os.environ.get("CUDA_VISIBLE_DEVICES"):
                return DeviceChoice(torch.device("cuda", 0), "first GPU in CUDA_VISIBLE_DEVICES")
            best = max(range(len(free)), key=free.__getitem__)
            gib = free[best] / 2**30
            why = f"most free memory ({gib:.1f} GiB) of {len(free)} GPUs" if len(free) > 1 \
                else "the only GPU"
            return DeviceChoice(torch.device("cuda", best), why)
        if env.mps_available():
            return DeviceChoice(torch.device("mps"), "Apple GPU (MPS)")
        return DeviceChoice(torch.device("cpu"), "no GPU found")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise LeantrainError(
            f"plan.device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise LeantrainError(
                f"plan.device {requested!r} asked for, but this machine has {count} CUDA device(s)"
            )
        return DeviceChoice(torch.device("cuda", index), "requested")
    if device.type == "mps" and not env.mps_available():
        raise LeantrainError("plan.device 'mps' asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LeantrainError(f"plan.device {requested!r}: allowed are auto, cpu, cuda, cuda:N, mps")
    return DeviceChoice(device, "requested")



def device_setting(requested: str) -> str:
    """A plan.device value that keeps this machine's device kind: "auto" becomes the kind it
    picks now (cuda, mps, cpu; a GPU index is still chosen per run); explicit values stay."""
    return select_device(requested).device.type if requested == "auto" else requested


def resolve_strategy(requested: str, ctx: DistContext, tp: int = 1, pp: int = 1
                     ) -> str | None:
    """None outside torchrun; "auto" is DDP (FSDP2 is for models that do not fit a device),
    FSDP2 under tensor parallelism (DDP cannot wrap its split layers), "pp" under pipeline
    parallelism (`pipeline_layout`)."""
    if not ctx.active:
        if requested != "auto" or pp > 1:
            what = f"plan.distributed {requested!r}" if pp == 1 else f"plan.parallel.pp={pp}"
            alone = "; one process trains it with --set plan.parallel.pp=1 (a resume too)" \
                if pp > 1 else ""
            raise LeantrainError(f"{what} needs processes started by "
                                 f"`leantrain launch --nproc N -- train ...` (torchrun){alone}")
        return None
    if pp > 1:
        return pipeline_layout(requested, ctx, tp, pp)
    if requested == "auto":
        return "fsdp" if tp > 1 else "ddp"
    return requested


def pipeline_layout(requested: str, ctx: DistContext, tp: int, pp: int) -> str:
    """Pipeline stages, one pipeline per data-parallel rank: the world a multiple of pp, each
    pipeline's stages FSDP2-sharded over the data-parallel ranks when there are several."""
    if requested != "auto" or ctx.world_size % (pp * tp):
        raise LeantrainError(f"plan.parallel.pp={pp} needs the {ctx.world_size} processes a "
                             f"multiple of pp x tp ({pp * tp}: the rest data parallel) and "
                             "plan.distributed=auto")
    return "pp"


def layout(cfg: PlanConfig, dist: DistContext) -> tuple[str | None, int]:
    """(strategy, hybrid replicas) of plan.distributed and plan.parallel on `dist`'s
    processes, checked: the settings alone decide it, so `launch` checks them too, before it
    starts a process (each rank would say the same, a few lines each)."""
    parallel, tp, pp = cfg.parallel, cfg.parallel.tp, cfg.parallel.pp
    strategy = resolve_strategy(cfg.distributed, dist, tp, pp)
    if pp > 1 and (parallel.dp_replicate != 1 or parallel.dp_shard not in (
            "auto", dist.world_size // pp // tp)):
        raise LeantrainError(f"plan.parallel.pp={pp}: its data-parallel ranks (the processes "
                             "/ pp / tp) shard each stage; hybrid sharding (dp_replicate) with "
                             "pipeline stages is not built yet")
    replicas = 1 if pp > 1 else distributed.replica_groups(
        parallel.dp_replicate, parallel.dp_shard, strategy, dist.world_size, tp)
    if parallel.tp_plan and tp == 1:
        raise LeantrainError(f"plan.parallel.tp_plan ({parallel.tp_plan}) splits layers for "
                             "tensor parallel: set plan.parallel.tp to the ranks to split over")
    if parallel.tp_plan and pp > 1:
        raise LeantrainError(f"plan.parallel.tp_plan ({parallel.tp_plan}) with pipeline stages "
                             "is not built yet (each process holds only its stages' blocks): "
                             "the model's own plan splits them")
    if parallel.sp and pp > 1:
        raise LeantrainError("plan.parallel.sp with pipeline stages is not built yet (the "
                             "stages would pass a stream split over the sequence): use "
                             "plan.parallel.sp=false with pp")
    if parallel.sp and (tp == 1 or parallel.tp_plan):
        raise LeantrainError("plan.parallel.sp splits the stream between leantrain's "
                             "tensor-parallel layers: it needs plan.parallel.tp > 1 and the "
                             "model's own plan (a plan.parallel.tp_plan hook applies its own)")
    return strategy, replicas


@dataclass
class ResolvedPlan:
    device: torch.device
    precision: str
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool
    tf32: bool
    optimizer_impl: str
    grad_accum: int
    outcomes: list[Outcome] = field(default_factory=list)
    distributed: str | None = None  # "ddp" | "fsdp" under `leantrain launch`, else None
    replicas: int = 1  # FSDP2's hybrid-sharding replicas (plan.parallel.dp_replicate)
    tp: int = 1  # tensor-parallel degree (plan.parallel.tp)
    tp_layers: dict[str, str] = field(default_factory=dict)  # module -> split (tp > 1)
    tp_hook: str | None = None  # plan.parallel.tp_plan: the user's plan instead
    sp: bool = False  # sequence parallel, the loss over vocabulary-split logits
    pp: int = 1  # pipeline stages' processes (plan.parallel.pp); grad_accum: micro-batches
    pp_schedule: str = "1f1b"
    microbatches: int = 1  # a pipeline step's (plan.grad_accum; grad_accum is then 1)
    activation_checkpointing: bool = False
    optimizer_states: str = "fp32"
    compile_mode: str = "default"
    optimizer_offload: bool = False
    fused_cross_entropy: bool = False

    def __post_init__(self) -> None:
        self._autocast = precision.autocast_factory(self.device, self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context forward passes (and the loss) run in: built once, for the plan."""
        return self._autocast()

    def use_precision(self, value: str) -> None:
        """Autocast to `value` from the next forward on (a precision decided mid-run)."""
        self.precision = value
        self._autocast = precision.autocast_factory(self.device, value)

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "compile_mode": self.compile_mode,
            "cudnn_benchmark": self.cudnn_benchmark,
            "tf32": self.tf32,
            "optimizer_impl": self.optimizer_impl,
            "optimizer_states": self.optimizer_states,
            "optimizer_offload": self.optimizer_offload,
            "fused_cross_entropy": self.fused_cross_entropy,
            "grad_accum": self.grad_accum,
            "distributed": self.distributed,
            "replicas": self.replicas,
            "tp": self.tp,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "activation_checkpointing": self.activation_checkpointing,
            "outcomes": {o.name: o.describe() for o in self.outcomes},
        }


def resolve_plan(cfg: PlanConfig, model: nn.Module, tokens_per_batch: int | None = None,
                 optimizer_name: str | None = None, dist: DistContext | None = None,
                 notes: dict[str, str] | None = None, clip_norm: float | None = None
                 ) -> ResolvedPlan:
    """The plan's techniques decided for this machine and model.

    `tokens_per_batch`: one micro-batch's tokens, for language models (tokens_per_step);
    `optimizer_name` (optim.name) decides which optimizer kernels can run; `notes` (per
    technique) say how a value was decided, e.g. by measurement (`run.defaults`);
    `clip_norm` (train.clip_norm) what must run between backward and the step.
    """
    dist = dist or DistContext.from_env()
    choice = select_device(cfg.device)
    device = rank_device(dist, choice.device)
    reason = f"one GPU per local rank ({dist.local_rank})" if device != choice.device \
        else choice.reason
    outcomes = [Outcome("device", True, f"{device} ({reason})")]
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if cfg.parallel.cp > 1:
        where = "this run's device is " + device.type if device.type != "cuda" else \
            "leantrain does not build it yet"
        raise LeantrainError(f"plan.parallel.cp={cfg.parallel.cp}: context parallel splits "
                             "attention over the sequence with CUDA's attention kernels (the "
                             f"CPU's have no sharding rule for it); {where}: use "
                             "plan.parallel.cp=1")
    strategy, replicas = layout(cfg, dist)
    hook = cfg.parallel.tp_plan if tp > 1 else None  # (the user's plan: layers unknown here)
    tp_layers = tensor_parallel.layer_plan(model, tp) if tp > 1 and hook is None else {}
    if cfg.parallel.sp:
        tensor_parallel.check_sequence_parallel(model, tp_layers, tp)
    tensor_parallel.check_sharding(tp_layers, tp, dist.world_size // tp // pp // replicas)
    # (the processes that see different batches: a tensor-parallel group's share one)
    ctx = Context(device, model, optimizer_name, strategy, dist.world_size // tp // pp,
                  tokens_per_batch, clip_norm)
    values = {}
    for technique in PLANNED:
        values[technique.NAME], outcome = technique.decide(ctx, cfg)
        note = (notes or {}).get(technique.NAME)
        outcomes.append(replace(outcome, detail=f"{outcome.detail}; {note}") if note else outcome)
    microbatches = 1
    if pp > 1:  # (the loop steps at every batch: the schedule runs its micro-batches)
        pipelined.settle(cfg, values, outcomes, model, pp, dist.world_size // pp // tp)
        microbatches, values["grad_accum"] = values["grad_accum"], 1
    data = dist.world_size // tp // pp
    hybrid = f" (hybrid: {replicas} replicas x {data // replicas} shards)" \
        if replicas > 1 else ""
    split = f"split by {hook}" if hook else f"{len(tp_layers)} layers split" + (
        "; sequence parallel: the norms over the sequence, the loss over the vocabulary"
        if cfg.parallel.sp else "")
    hybrid += f", tensor parallel over {tp} ranks ({split})" if tp > 1 else ""
    hybrid += (f" ({cfg.parallel.pp_schedule}: {pipelined.describe(model, cfg.parallel)}, "
               f"{microbatches} micro-batches a step"
               f"{f'; {data} pipelines, each stage FSDP2-sharded over them' if data > 1 else ''}"
               ")") if pp > 1 else ""
    outcomes.append(Outcome("distributed", strategy is not None,
                            f"{strategy} over {dist.world_size} process(es){hybrid}, rank "
                            f"{dist.rank}" if strategy else
                            "one process (start several with leantrain launch)"))
    return ResolvedPlan(device=device, outcomes=outcomes, distributed=strategy,
                        replicas=replicas, tp=tp, tp_layers=tp_layers, tp_hook=hook,
                        sp=cfg.parallel.sp, pp=pp,
                        pp_schedule=cfg.parallel.pp_schedule, microbatches=microbatches,
                        **values)


LossFn = Callable[..., torch.Tensor]


@dataclass
class Run:
    """A training run, decided: what the loop, the bench, the finders and doctor read."""

    cfg: TrainConfig
    plan: ResolvedPlan
    dist: DistContext
    model: nn.Module  # on the device, memory format and activation checkpointing applied
    wrapped: nn.Module  # what the step calls: DDP or FSDP2 around the model, or the model
    step: step.Step  # how batches reach the model and become a loss (the task inferred)
    train_loader: object  # InMemoryBatches | DataLoaderBatches
    val_loader: object
    loader_options: LoaderOptions
    loader_tuning: LoaderTuning | None
    num_classes: int | None  # the width of the model's logits (None: it returns a loss only)
    tensor_backed: bool
    # optimizer steps per epoch of a run that keeps every batch: the LR schedule's horizon is
    # the same for a compiled or autotuned run (which drops the short last batch) as for a plain
    # one, so the bench can compare their first losses step by step; None for a stream
    steps_per_epoch: int | None
    train_data: Dataset | None = None  # (what a checkpoint fingerprints: `data_fingerprint`)
    val_data: Dataset | None = None
    pipeline: Any = None  # this process's pipeline stages (plan.parallel.pp), else None

    @functools.cached_property
    def data_fingerprint(self) -> dict[str, Any]:
        """The training and validation sets' lengths and digests (taken once): a resume
        checks them."""
        return {"train": fingerprint(self.train_data), "val": fingerprint(self.val_data)} \
            if self.train_data is not None and self.val_data is not None else {}

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: the epochs', or train.max_steps if fewer (a
        stream's run is train.max_steps: `build` refuses a stream without it)."""
        if self.steps_per_epoch is None:
            return self.cfg.train.max_steps
        steps = self.steps_per_epoch * self.cfg.train.epochs
        return min(steps, self.cfg.train.max_steps or steps)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Process-wide settings the run needs, restored afterwards: backend flags, threads."""
        cuda = self.plan.device.type == "cuda"
        with (cudnn_benchmark.enabled(self.plan.cudnn_benchmark) if cuda
              else contextlib.nullcontext()), \
                (tf32.enabled(self.plan.tf32) if cuda else contextlib.nullcontext()), \
                compute_threads(self.loader_options):
            yield


def prepare_model(model: nn.Module, plan: ResolvedPlan) -> nn.Module:
    """The model on its device, in the plan's layout: before any measuring, so it measures
    the run's layout."""
    model = model.to(plan.device)
    if plan.precision in precision.FP8_RECIPES:
        precision.apply_float8(model, plan.precision)
    if plan.channels_last:
        apply_channels_last(model)
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    if plan.optimizer_states == "bf16":
        apply_bf16_weights(model)
    if plan.fused_cross_entropy:
        apply_fused_cross_entropy(model)
    return model


def _drops_short_batch(plan: ResolvedPlan, model: nn.Module, n: int | None, batch_size: int,
                       world: int) -> bool:
    """A compiled or cuDNN-autotuned model trains on full batches only (when there is one):
    the epoch's short last batch is a new shape to compile or tune for. On an H100 the
    recompile cost 21 s of a 35 s text-gpt run, and autotuning it put doctor's 20 timed
    digits steps at 938 samples/s against 5,132 over 200. A BatchNorm model drops a last
    batch of one sample, which it cannot train on (the shuffle still shows every sample); over
    a stream (`n` None: its last batch is not known ahead) it drops any short last batch."""
    if plan.pp > 1:  # a pipeline's micro-batches are all one shape (torch sizes its buffers
        return True  # from the first): a short batch would split unevenly
    if n is None:
        return plan.compile or plan.cudnn_benchmark or _has_batchnorm(model)
    if n < batch_size * world:
        return False
    lone = world == 1 and n % batch_size == 1 and _has_batchnorm(model)
    if lone:
        log.info("the last batch of each epoch would hold 1 sample, which BatchNorm cannot "
                 "train on: it is dropped (the shuffle still shows every sample)")
    return plan.compile or plan.cudnn_benchmark or lone


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _all_labels(*tensor_sets) -> torch.Tensor | None:
    """Every label of the tensor-backed training and validation sets, flattened (their range
    is checked before training, not only the first batch's); None when there are none."""
    found = [labels_of(t) for t in tensor_sets if t is not None]
    found = [t.reshape(-1) for t in found if isinstance(t, torch.Tensor)]
    if not found or len({t.dtype for t in found}) > 1:
        return found[0] if len(found) == 1 else None
    return torch.cat(found)


def stream_samples(cfg: TrainConfig) -> int:
    """Samples a run over a stream trains on (its length is train.max_steps)."""
    return cfg.train.max_steps * cfg.data.batch_size * cfg.plan.grad_accum


def check_trainable(model: nn.Module) -> None:
    """A model with nothing to train fails at its first backward, deep in autograd: say so
    before any work (a model with no parameters, or every one frozen)."""
    total = sum(p.numel() for p in model.parameters())
    if total == 0:
        raise LeantrainError(f"the model ({type(model).__name__}) has no parameters: nothing "
                             "to train")
    if not any(p.requires_grad for p in model.parameters()):
        raise LeantrainError(f"every parameter of the model ({type(model).__name__}, {total:,} "
                             "values) is frozen (requires_grad=False): nothing to train; "
                             "unfreeze the ones to learn")


def decide(cfg: TrainConfig, model: nn.Module, train_data: Dataset,
           collate_fn: Callable[[list], object] | None = None, dist: DistContext | None = None,
           notes: dict[str, str] | None = None) -> tuple[ResolvedPlan, bool]:
    """The plan's decisions and whether batches come from memory, from the model's structure
    and the config alone: nothing moved, loaded or run. Raises the LeantrainError of a plan
    that cannot run here (what most refusals are: a CUDA-only setting on a CPU, NHWC for a
    model without convolutions), so the bench can find them before it times anything."""
    check_trainable(model)
    data = cfg.data
    tokens = data.batch_size * data.context if data.context else None
    plan = resolve_plan(cfg.plan, model, tokens, cfg.optim.name, dist, notes,
                        cfg.train.clip_norm)
    return plan, loader.in_memory(data.loader, train_data, collate_fn)


def build(cfg: TrainConfig, model: nn.Module, train_data: Dataset, val_data: Dataset,
          loss_fn: LossFn | None = None, measure_loader: bool = True,
          collate_fn: Callable[[list], object] | None = None,
          notes: dict[str, str] | None = None, evaluates: bool = True,
          drop_last: bool = False) -> Run:
    """Decide the run. `loss_fn` replaces the model's own loss and the task's; `collate_fn`
    batches samples (e.g. a padding collator: a DataLoader then, never the in-memory loader).
    `measure_loader=False` resolves "auto" loader settings to defaults without measuring
    (short trials that measure something else pass it); a run that `evaluates` checks its
    validation set's first batch too (trials never evaluate); `drop_last` drops each epoch's
    short last batch whatever the plan (a resume of a run several processes started)."""
    check_datasets(train_data, val_data)
    streamed = is_stream(train_data)
    if streamed and cfg.train.max_steps is None:
        raise LeantrainError(f"the training set is a stream ({type(train_data).__name__}, no "
                             "length): set how long to train with train.max_steps (e.g. --set "
                             "train.max_steps=1000); epochs apply when the stream ends")
    dist = DistContext.from_env()
    data = cfg.data
    plan, in_memory = decide(cfg, model, train_data, collate_fn, dist, notes)
    distributed.setup(dist, plan.device, cfg.train.dist_timeout_s)
    dist = distributed.with_mesh(dist, plan.device, plan.replicas, plan.tp, plan.pp)
    model = prepare_model(model, plan)
    on_cuda, shard = plan.device.type == "cuda", (dist.data_rank, dist.data_world)
    size = data.batch_size * plan.microbatches  # (a pipeline's batch: its micro-batches)
    drop = drop_last or _drops_short_batch(plan, model, None if streamed else len(train_data),
                                           size, dist.data_world)

    def train_loader(options: LoaderOptions):
        return make_loader(train_data, size, True, cfg.train.seed, plan.device,
                           options, in_memory, shard, drop_last=drop, collate_fn=collate_fn)

    options = loader.default_options(data, on_cuda, cfg.train.epochs)
    batches = train_loader(options)
    if batches_per_epoch(batches) == 0:
        raise LeantrainError(
            f"{len(train_data)} training samples make no full batch of "
            f"{size} x {dist.data_world} processes; lower data.batch_size")
    if not is_stream(val_data) and len(val_data) == 0:
        raise LeantrainError("the validation set is empty; give it samples (or, for a single "
                             "dataset, a data.val_fraction that leaves some)")
    contract = step.step_for(model, plan, cfg.train.task, loss_fn)
    whole = tensors_of(train_data)  # a Subset's are an indexed copy: taken once
    val_whole = tensors_of(val_data)
    for name, tensors in (("training", whole), ("validation", val_whole)):
        bad = first_non_finite(tensors) if tensors is not None else None
        if bad is not None:
            raise LeantrainError(f"the {name} set's sample {bad[0]} holds {bad[1]}; inputs "
                                 "must be finite numbers")
    contract, num_classes = step.check_first_batch(model, batches, contract,
                                                   _all_labels(whole, val_whole))
    tuning = None
    tunable = loader.auto_fields(data)
    # ranks measuring apart could choose apart: under launch, "auto" keeps the defaults
    if (measure_loader and not dist.active and not in_memory
            and loader.worth_measuring(tunable, options, on_cuda)):
        with untouched(model):
            tuning = tune_loader(train_data, data.batch_size,
                                 lambda batch: contract.probe(model, batch), options, tunable,
                                 on_cuda, cfg.train.epochs, cfg.train.seed,
                                 collate_fn=collate_fn, run_samples=stream_samples(cfg)
                                 if streamed else None)
        log.info("data loader: %s", tuning.describe())
        options = tuning.choice
        batches = train_loader(options)
    val = make_loader(val_data, data.eval_batch_size, False, cfg.train.seed, plan.device,
                      replace(options, persistent_workers=False),
                      loader.in_memory(data.loader, val_data, collate_fn), collate_fn=collate_fn)
    if evaluates:
        step.check_evaluation(model, val, contract)
    if plan.distributed in ("fsdp", "pp"):  # sharded or staged: initialised whole, first
        init_weights(model, cfg.train.init)
    stages = pipelined.build(model, contract, first_batch(batches), plan, dist) \
        if plan.pp > 1 else None
    if plan.tp > 1 and stages is None:  # split layers, then shard over the data ranks
        tensor_parallel.apply(model, dist.mesh["tp"], plan.tp_layers, plan.tp_hook, plan.sp)
    wrapped = distributed.wrap(model, plan.distributed, plan.device, plan.precision,
                               distributed.data_mesh(dist))
    kept = None if streamed else batch_count(len(train_data), size, shard, drop_last)
    return Run(cfg, plan, dist, model, wrapped, contract, batches, val, options, tuning,
               num_classes, whole is not None,
               None if kept is None else math.ceil(kept / plan.grad_accum), train_data,
               val_data, stages)
