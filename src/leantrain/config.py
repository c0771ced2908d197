"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

Every key is declared once here, with its type and default. Loading rejects an unknown key or
a value of the wrong type with a message that names the key, the value and what is allowed,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import LeantrainError, bounded_repr, shorten

Auto = Literal["auto"]
CONFIG_NAME = "config.yaml"  # a run folder's config: what `--resume` continues with
STDLIB = "python-stdlib"  # data.source: the Python standard library's sources, as text


@dataclass
class DataConfig:
    """Where the data comes from and how it is batched."""

    source: str = "digits"  # digits | a path (.npz, .csv, image folder) | "pkg.module:fn"
    batch_size: int = 64
    eval_batch_size: int = 512
    val_fraction: float = 0.2  # used when the source has no split of its own
    label_column: str = "label"  # CSV sources and labelled text tables
    image_size: int | None = None  # image folders: resize to this square size
    # DataLoader path only (the in-memory loader needs none). "auto": chosen by a short
    # measurement of the training step before the run, and reported
    num_workers: Auto | int = "auto"
    pin_memory: Auto | bool = "auto"  # auto: on when training on CUDA
    prefetch_factor: Auto | int = "auto"  # batches each worker keeps ready
    persistent_workers: Auto | bool = "auto"  # auto: on with workers and more than one epoch
    # auto: batched indexing for tensor-backed datasets, a DataLoader otherwise
    loader: Literal["auto", "in-memory", "dataloader"] = "auto"
    # text for language models: when set, the source (python-stdlib, a file or a folder) is
    # read as bytes, cut into samples of `context` bytes that predict the next byte
    context: int | None = None
    max_bytes: int = 4_000_000  # text: at most this much train text (val: a tenth)
    # text: a local tokenizer.json (or a folder holding one): the corpus is tokenized once into
    # token shards (cached), read as windows of `context` tokens; max_bytes does not apply
    tokenizer: str | None = None
    text_field: str = "text"  # a .jsonl/.parquet/.arrow corpus or table: the text's key
    max_tokens: int = 128  # a labelled text table: tokens kept of each row (its label_column)


# torch.optim's own defaults (tests/test_config.py checks them against torch's signatures):
# an optim.* key left unset means what it means in the user's own torch.optim call
TORCH_OPTIM_DEFAULTS = {"sgd": {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0},
                        "adam": {"lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0},
                        "adamw": {"lr": 1e-3, "momentum": 0.0, "weight_decay": 1e-2}}


@dataclass
class OptimConfig:
    """The optimizer as the user would build it. The recipes set their tuned values; for
    a model of the user's own, unset keys take torch.optim's defaults (`resolved()`)."""

    name: Literal["sgd", "adamw", "adam"] = "adamw"
    # the peak learning rate: no schedule exceeds it. Unset: torch's default (1e-3), and the
    # run summary says so and points to `leantrain find-lr` / `leantrain tune`
    lr: float | None = None
    momentum: float | None = None  # sgd only; unset: torch's 0
    nesterov: bool = False
    weight_decay: float | None = None  # unset: torch's (adamw 0.01, sgd and adam 0)

    def resolved(self) -> OptimConfig:
        """The values the optimizer runs with: each unset key at torch.optim's default."""
        found = TORCH_OPTIM_DEFAULTS[self.name]
        return dataclasses.replace(self, **{k: found[k] for k in ("lr", "momentum",
                                                                 "weight_decay")
                                            if getattr(self, k) is None})


@dataclass
class ScheduleConfig:
    # the default is decided by benchmarks/schedules.py: over 7 model types, 2 lrs and 2 run
    # lengths, every decaying schedule ended worse than constant somewhere beyond noise
    name: Literal["constant", "step", "cosine", "onecycle", "wsd"] = "constant"
    warmup_fraction: float = 0.0  # share of all steps spent warming up linearly
    decay_fraction: float = 0.2  # wsd: share of all steps, at the end, decaying to zero
    step_size: int = 0  # step schedule: decay every N optimizer steps (0: every epoch)
    gamma: float = 0.1  # step schedule: decay factor


@dataclass
class TrainLoopConfig:
    epochs: int = 8
    target_acc: float | None = None  # stop as soon as validation accuracy reaches this
    # stop as soon as a validation metric meets this, e.g. "val_loss<=0.5" (METRIC OP VALUE)
    target: str | None = None
    max_steps: int | None = None  # stop after exactly this many optimizer steps
    eval_every_steps: int = 0  # evaluate every N optimizer steps too (0: at epoch ends only)
    # what the model learns; auto: inferred from the first batch (see losses.tasks)
    task: Literal["auto", "classification", "token-classification", "causal-lm", "regression",
                  "multi-label", "model-loss"] = "auto"
    seed: int = 0
    clip_norm: float | None = None
    init: Literal["default", "kaiming", "xavier", "orthogonal", "dirac"] = "default"
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: end of each epoch only
    # several processes: write the periodic checkpoints' shards in the background while
    # training goes on (each waits for the previous; the last one and a stop's are written
    # at once)
    async_checkpoint: bool = False
    # several processes: sharded checkpoints kept (the last, and older ones in case it is
    # damaged); one process keeps its single file
    keep_checkpoints: int = 2
    log_every: int = 10  # optimizer steps between logged training metrics
    eval_every_epochs: int = 1
    monitor_interval_s: float = 1.0  # CPU/GPU utilization sampling period; 0 turns it off
    dist_timeout_s: float = 60.0  # bound on any collective: a dead peer fails the job, no hang


TP_PLAN_FLAG = "--set plan.parallel.tp_plan"  # how a command line names a user's TP plan


@dataclass
class ParallelConfig:
    """How the processes of `leantrain launch` lay out the model under FSDP2."""

    # hybrid sharding: groups of ranks that each hold a whole sharded copy of the model and
    # all-reduce gradients between them (replicate across nodes, shard within one); 1 shards
    # over every process
    dp_replicate: int = 1
    dp_shard: Auto | int = "auto"  # ranks one copy is sharded over; auto: the rest
    # tensor parallel: ranks that split each planned layer (attention heads, MLP channels)
    # and see the same batch; needs FSDP2 (auto picks it) and the model's plan
    tp: int = 1
    # "module:fn": fn(model, mesh) splits the model's layers over the tp mesh itself (torch's
    # parallelize_module), in place of the model's own plan
    tp_plan: str | None = None
    # sequence parallel, with tp: the norms and residual stream between the split layers are
    # split over the sequence (activations tp-fold smaller), and the head's logits stay split
    # over the vocabulary into the loss (loss_parallel); needs the model's plan to split its
    # embedding and head (an untied Hugging Face causal LM: Llama, Mistral, Qwen2...)
    sp: bool = False
    # pipeline parallel: ranks that each hold a contiguous share of the model's repeated
    # blocks (the first also the embeddings, the last the head and loss); plan.grad_accum
    # sets the micro-batches in flight; processes / pp pipelines, each stage FSDP2-sharded
    pp: int = 1
    # torch.distributed.pipelining's schedule; the interleaved ones hold 2 stages a rank
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zero-bubble"] = "1f1b"
    # context parallel (attention split over the sequence): needs CUDA GPUs, not built yet
    cp: int = 1


@dataclass
class PlanConfig:
    """Which runtime techniques to use. "auto" lets leantrain decide for this machine."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # fp8: torchao float8 training (tensorwise scales; fp8-rowwise: per-row) on GPUs of compute
    # capability >= 8.9, the other layers in bf16 autocast
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8", "fp8-rowwise"] = "auto"
    channels_last: Auto | bool = "auto"
    # auto: eager unless measured to pay on this run (run.compile_choice)
    compile: Auto | bool = "auto"
    # torch.compile's mode: max-autotune searches kernel configurations (and replays CUDA graphs
    # on a GPU); reduce-overhead replays CUDA graphs (CUDA only)
    compile_mode: Literal["default", "max-autotune", "max-autotune-no-cudagraphs",
                          "reduce-overhead"] = "default"
    cudnn_benchmark: Auto | bool = "auto"
    tf32: Auto | bool = "auto"
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    # Adam/AdamW moments: fp32, or torchao's 8-bit / 4-bit states, or bf16 weights and AdamW
    # moments with stochastic rounding (all lossy; auto keeps fp32)
    optimizer_states: Literal["auto", "fp32", "bf16", "8bit", "4bit"] = "auto"
    # the optimizer's states and step on the CPU, the model on one GPU (torchao)
    optimizer_offload: bool = False
    # Hugging Face causal LMs on CUDA: Liger's fused linear cross-entropy (no logits tensor)
    # (auto: off unless measured faster on this run, on CUDA with Liger installed)
    fused_cross_entropy: Auto | bool = "auto"
    grad_accum: int = 1
    # language models: accumulate micro-batches up to this many tokens per optimizer step
    # (sets grad_accum from data.batch_size x data.context x processes)
    tokens_per_step: int | None = None
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # under `leantrain launch`: auto = DDP; fsdp = FSDP2 (fully_shard) for models that do not
    # fit one device
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # reuse "auto" choices measured earlier for the same model, data shapes, machine and
    # versions (run.defaults); false measures again
    cache: bool = True


@dataclass
class GPTConfig:
    """The text-gpt recipe's architecture (context is data.context)."""

    depth: int = 4  # transformer blocks
    width: int = 192  # model dimension
    heads: int = 4  # attention heads; width must divide by it
    tie_weights: bool = True  # output projection shares the byte embedding's weights


@dataclass
class TrainConfig:
    recipe: str = "digits-cnn"
    model: str | None = None  # "pkg.module:fn" returning an nn.Module
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """Return (ok, value) for `value` checked against type `tp` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        # exact type too: YAML's `true` must not match a literal 1, nor 1 match True
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, coerced = _coerce(arg, value)
            if ok:
                return True, coerced
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        # YAML 1.1 reads 6e-4 (no dot) as a string; it is a float to anyone writing it
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"config type {tp!r} is not supported by the validator")


class ConfigKeyError(LeantrainError):
    """A wrong key or value at `path` (the keys from the root) holding `value`: the command
    can then say which of the user's files holds it."""

    def __init__(self, message: str, path: tuple, value: Any):
        super().__init__(message)
        self.path, self.value = path, value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    here = tuple(prefix.rstrip(".").split(".")) if prefix else ()
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "<root>"
        raise ConfigKeyError(f"config section '{where}' must be a mapping, got "
                             f"{bounded_repr(values)}", here, values)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigKeyError(f"unknown config key '{prefix}{shorten(key, 80)}'; allowed keys "
                                 f"here: {', '.join(fields)}", (*here, key), value)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        ok, coerced = _coerce(tp, value)
        shown = bounded_repr(value)  # a file's value may be megabytes
        if not ok:
            raise ConfigKeyError(f"config key '{prefix}{key}' has value {shown} "
                                 f"({type(value).__name__}); allowed: {_describe(tp)}",
                                 (*here, key), value)
        if isinstance(coerced, float) and not math.isfinite(coerced):  # nan, inf, 1e400
            raise ConfigKeyError(f"config key '{prefix}{key}' has value {shown}; allowed: a "
                                 "finite number", (*here, key), value)
        kwargs[key] = coerced
    return cls(**kwargs)


FILE_NAMED_LINE = 260  # characters of an error that names the file it found in


@contextlib.contextmanager
def naming_the_file(path: str | Path, values: dict[str, Any]):
    """A wrong key or value that the user's file `path` (read into `values`) holds is named
    with the file: "unknown config key 'a'" alone leaves a user with three files to search."""
    try:
        yield
    except ConfigKeyError as exc:
        held = values
        for key in exc.path:
            if not isinstance(held, dict) or key not in held:
                raise
            held = held[key]
        if held is not exc.value:  # a --set or a flag gave it, not the file
            raise
        where = f" (in {shorten(Path(path).name, 60)})"
        message = str(exc)  # (the whole line stays within what a terminal line holds)
        room = FILE_NAMED_LINE - len(where)
        if len(message) > room:
            message = message[:room - 3] + "..."
        raise LeantrainError(message + where) from exc


# processes a command may start on one machine (loader workers, launch ranks, tune workers):
# 4 per core, at least 8; 100000 once forked until the machine stopped answering
MAX_PROCESSES = max(8, 4 * (os.cpu_count() or 1))
MAX_IMAGE_SIZE = 8192  # pixels a side: 100000 asked for 120 GB an image


def check_processes(name: str, value: int, low: int = 1) -> None:
    """A count of processes to start: from `low` to MAX_PROCESSES, in one line otherwise."""
    if not low <= value <= MAX_PROCESSES:
        raise LeantrainError(f"{name} must be in {low}..{MAX_PROCESSES} on this machine (4 per "
                             f"core, at least 8), got {value}")


def _check_ranges(cfg: TrainConfig) -> None:
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "train.epochs": cfg.train.epochs,
        "train.log_every": cfg.train.log_every,
        "train.dist_timeout_s": cfg.train.dist_timeout_s,
        "train.eval_every_epochs": cfg.train.eval_every_epochs,
        "plan.grad_accum": cfg.plan.grad_accum,
        "plan.parallel.dp_replicate": cfg.plan.parallel.dp_replicate,
        "plan.parallel.tp": cfg.plan.parallel.tp,
        "plan.parallel.pp": cfg.plan.parallel.pp,
        "plan.parallel.cp": cfg.plan.parallel.cp,
        "data.max_bytes": cfg.data.max_bytes,
        "optim.lr": cfg.optim.resolved().lr,
        "gpt.depth": cfg.gpt.depth,
        "gpt.width": cfg.gpt.width,
        "gpt.heads": cfg.gpt.heads,
    }
    for key, value in positive.items():
        if value <= 0:
            raise LeantrainError(f"config key '{key}' must be > 0, got {value!r}")
    checks = [
        ("data.val_fraction", cfg.data.val_fraction, 0 < cfg.data.val_fraction < 1, "in (0, 1)"),
        ("optim.momentum", cfg.optim.momentum, 0 <= cfg.optim.resolved().momentum < 1,
         "in [0, 1)"),
        ("optim.weight_decay", cfg.optim.weight_decay, cfg.optim.resolved().weight_decay >= 0,
         ">= 0"),
        ("schedule.gamma", cfg.schedule.gamma, cfg.schedule.gamma > 0, "> 0"),
        ("schedule.step_size", cfg.schedule.step_size, cfg.schedule.step_size >= 0, ">= 0"),
        ("train.seed", cfg.train.seed, 0 <= cfg.train.seed < 2**32,
         "in [0, 2**32) (numpy's seed range)"),
        ("train.checkpoint_every", cfg.train.checkpoint_every, cfg.train.checkpoint_every >= 0,
         ">= 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints, cfg.train.keep_checkpoints >= 1,
         ">= 1"),
        ("train.monitor_interval_s", cfg.train.monitor_interval_s,
         cfg.train.monitor_interval_s >= 0, ">= 0"),
        ("schedule.warmup_fraction", cfg.schedule.warmup_fraction,
         0 <= cfg.schedule.warmup_fraction < 1, "in [0, 1)"),
        ("schedule.decay_fraction", cfg.schedule.decay_fraction,
         0 < cfg.schedule.decay_fraction <= 1 - cfg.schedule.warmup_fraction,
         "in (0, 1 - schedule.warmup_fraction]"),
    ]
    if cfg.data.num_workers != "auto":
        checks.append(("data.num_workers", cfg.data.num_workers,
                       0 <= cfg.data.num_workers <= MAX_PROCESSES,
                       f"in 0..{MAX_PROCESSES} or auto"))
    if cfg.data.image_size is not None:
        checks.append(("data.image_size", cfg.data.image_size,
                       1 <= cfg.data.image_size <= MAX_IMAGE_SIZE, f"in 1..{MAX_IMAGE_SIZE}"))
    if cfg.data.context is not None:
        checks.append(("data.context", cfg.data.context, cfg.data.context >= 1, ">= 1"))
    checks.append(("data.max_tokens", cfg.data.max_tokens, cfg.data.max_tokens >= 1, ">= 1"))
    if cfg.data.prefetch_factor != "auto":
        checks.append(("data.prefetch_factor", cfg.data.prefetch_factor,
                       cfg.data.prefetch_factor >= 1, ">= 1 or auto"))
    if cfg.train.target_acc is not None:
        checks.append(("train.target_acc", cfg.train.target_acc,
                       0 < cfg.train.target_acc <= 1, "in (0, 1]"))
    if cfg.plan.parallel.dp_shard != "auto":
        checks.append(("plan.parallel.dp_shard", cfg.plan.parallel.dp_shard,
                       cfg.plan.parallel.dp_shard >= 1, ">= 1 or auto"))
    if cfg.plan.tokens_per_step is not None:
        checks.append(("plan.tokens_per_step", cfg.plan.tokens_per_step,
                       cfg.plan.tokens_per_step >= 1, ">= 1"))
    checks.append(("gpt.width", cfg.gpt.width, cfg.gpt.width % cfg.gpt.heads == 0,
                   f"divisible by gpt.heads ({cfg.gpt.heads})"))
    if cfg.train.clip_norm is not None:
        checks.append(("train.clip_norm", cfg.train.clip_norm, cfg.train.clip_norm > 0, "> 0"))
    if cfg.train.max_steps is not None:
        checks.append(("train.max_steps", cfg.train.max_steps, cfg.train.max_steps >= 1, ">= 1"))
    checks.append(("train.eval_every_steps", cfg.train.eval_every_steps,
                   cfg.train.eval_every_steps >= 0, ">= 0"))
    if cfg.train.target is not None:
        parse_target(cfg.train.target)
        if cfg.train.target_acc is not None:
            raise LeantrainError("set train.target or train.target_acc, not both (got "
                                 f"{cfg.train.target!r} and {cfg.train.target_acc!r})")
    for key, value, ok, allowed in checks:
        if not ok:
            raise LeantrainError(f"config key '{key}' must be {allowed}, got {value!r}")


TARGET_METRICS = ("val_accuracy", "val_loss", "val_mae", "val_perplexity")
_TARGET = re.compile(r"\s*(\w+)\s*(<=|>=|<|>)\s*(\S+)\s*")
_COMPARE = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__}


def parse_target(text: str) -> tuple[str, str, float]:
    """("val_loss", "<=", 0.5) from "val_loss<=0.5"; a one-line error for anything else."""
    match = _TARGET.fullmatch(text)
    value = None
    if match:
        try:
            value = float(match.group(3))
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or match.group(1) not in TARGET_METRICS:
        raise LeantrainError(f"target {text!r} must look like METRIC OP VALUE, e.g. "
                             f"val_loss<=0.5; METRIC: {', '.join(TARGET_METRICS)}; OP: <=, >=, "
                             f"<, >")
    return match.group(1), match.group(2), value


def target_of(cfg: TrainConfig) -> tuple[str, str, float] | None:
    """The run's stopping target: train.target, or train.target_acc as val_accuracy>=X."""
    if cfg.train.target is not None:
        return parse_target(cfg.train.target)
    if cfg.train.target_acc is not None:
        return "val_accuracy", ">=", cfg.train.target_acc
    return None


def target_met(target: tuple[str, str, float] | None, found: dict[str, float | None]) -> bool:
    if target is None or found.get(target[0]) is None:
        return False
    return _COMPARE[target[1]](float(found[target[0]]), target[2])


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a validated TrainConfig from plain (e.g. YAML-loaded) values."""
    cfg = _build(TrainConfig, values or {}, "")
    _check_ranges(cfg)
    return cfg


# ---------------------------------------------------------------- sources of values


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: `lr: 0.1` above `lr: 3e-4` would train at the second without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LeantrainError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise LeantrainError(f"config file {path} is not UTF-8 text (byte {exc.start})") \
            from exc
    except OSError as exc:
        raise LeantrainError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise LeantrainError(f"config file {path} is not valid YAML: "
                             f"{_yaml_problem(exc)}") from exc
    except RecursionError as exc:  # (PyYAML composes nested collections by recursion)
        raise LeantrainError(f"config file {path} nests collections too deep to read; a "
                             "config is a few levels of sections and keys") from exc
    if values is None:  # an empty file (or comments only): an empty config
        return {}
    if not isinstance(values, dict):  # ('' from a lone ">", 0, false, []: not empty configs)
        raise LeantrainError(f"config file {path} must hold a mapping at the top level")
    return values


# A plan file (written by `leantrain bench`, read by `train --plan`) may set how to run, never
# what to train: the plan section, and the batching and learning-rate keys the finders tune.
PLAN_FILE_KEYS = {
    "plan": tuple(f.name for f in dataclasses.fields(PlanConfig)),
    "data": ("loader", "num_workers", "pin_memory", "prefetch_factor", "persistent_workers",
             "batch_size"),
    "optim": ("lr",),
}


def read_plan_file(path: str | Path) -> dict[str, Any]:
    """A plan file's values, after checking that it only holds keys a plan may set."""
    values = read_yaml(path)
    for section, node in values.items():
        if section not in PLAN_FILE_KEYS:
            raise LeantrainError(f"plan file {path}: section '{section}' is not allowed in a "
                                 f"plan; allowed sections: {', '.join(PLAN_FILE_KEYS)}")
        if not isinstance(node, dict):
            raise LeantrainError(f"plan file {path}: section '{section}' must be a mapping")
        for key in node:
            if key not in PLAN_FILE_KEYS[section]:
                raise LeantrainError(
                    f"plan file {path}: key '{section}.{key}' is not allowed in a plan; allowed "
                    f"in '{section}': {', '.join(PLAN_FILE_KEYS[section])}")
    return values


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `extra` into a copy of `base` (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, in one line (PyYAML's own text spans several, with a
    caret drawing)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem is None:
        return shorten(" ".join(str(exc).split()), 160)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return shorten(" ".join(problem.split()), 120) + where


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'optim.lr=0.1' into {'optim': {'lr': 0.1}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise LeantrainError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise LeantrainError(f"override {shorten(repr(text), 80)}: value is not valid YAML: "
                             f"{_yaml_problem(exc)}") from exc
    except RecursionError as exc:
        raise LeantrainError(f"override {shorten(repr(text), 80)}: the value nests too deep "
                             "to read") from exc
    return nest(key.strip(), value)


def nest(key: str, value: Any) -> dict[str, Any]:
    """'optim.lr', 0.1 -> {'optim': {'lr': 0.1}}."""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < `base` (e.g. a recipe's settings) < YAML file < dotted overrides."""
    values = dict(base or {})
    if path is not None:
        values = merge(values, read_yaml(path))
    for text in overrides:
        values = merge(values, parse_override(text))
    return config_from_dict(values)
