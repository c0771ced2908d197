"""Resolve a PlanConfig ("auto" here and there) into concrete choices for this machine and model.

Every technique ends up in the outcome list as applied, or not applied with the reason, so the
run summary tells the user exactly what was changed and why (no silent magic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import PlanConfig
from .distributed import DistContext, rank_device, resolve_strategy
from .env import select_device
from .errors import LeantrainError
from .techniques import (
    backend_flags,
    checkpointing,
    compile,
    memory_format,
    optimizer,
    precision,
)


@dataclass(frozen=True)
class Outcome:
    name: str
    applied: bool
    detail: str

    def describe(self) -> str:
        return f"applied: {self.detail}" if self.applied else f"not applied: {self.detail}"


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
    activation_checkpointing: bool = False

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "cudnn_benchmark": self.cudnn_benchmark,
            "tf32": self.tf32,
            "optimizer_impl": self.optimizer_impl,
            "grad_accum": self.grad_accum,
            "distributed": self.distributed,
            "activation_checkpointing": self.activation_checkpointing,
            "outcomes": {o.name: o.describe() for o in self.outcomes},
        }


def _choose(name: str, setting, auto_value: bool, check: tuple[bool, str]) -> tuple[bool, Outcome]:
    """Resolve an on/off technique: explicit True must be supported, 'auto' follows support."""
    ok, reason = check
    if setting is True and not ok:
        raise LeantrainError(f"plan.{name}: cannot be applied here: {reason}")
    on = ok and auto_value if setting == "auto" else bool(setting)
    if on:
        return True, Outcome(name, True, reason)
    return False, Outcome(name, False, "switched off in the plan" if ok else reason)


def _accumulation(cfg: PlanConfig, tokens_per_batch: int | None, processes: int
                  ) -> tuple[int, Outcome]:
    """Micro-batches per optimizer step: plan.grad_accum, or enough to reach tokens_per_step."""
    if cfg.tokens_per_step is None:
        n = cfg.grad_accum
        return n, Outcome("grad_accum", n > 1, f"{n} micro-batches per step" if n > 1
                          else "one batch per step")
    if tokens_per_batch is None:
        raise LeantrainError("plan.tokens_per_step is for language models (data.context set); "
                             "use plan.grad_accum for other models")
    if cfg.grad_accum != 1:
        raise LeantrainError("set plan.grad_accum or plan.tokens_per_step, not both "
                             f"(got {cfg.grad_accum} and {cfg.tokens_per_step})")
    per_micro = tokens_per_batch * processes
    n = max(1, round(cfg.tokens_per_step / per_micro))
    return n, Outcome("grad_accum", n > 1, f"{n} micro-batch(es) of {tokens_per_batch:,} tokens "
                      f"x {processes} process(es) = {n * per_micro:,} tokens per step "
                      f"(plan.tokens_per_step {cfg.tokens_per_step:,})")


def resolve_plan(cfg: PlanConfig, model: nn.Module, tokens_per_batch: int | None = None,
                 optimizer_name: str | None = None) -> ResolvedPlan:
    """`tokens_per_batch`: one micro-batch's tokens, for language models (tokens_per_step);
    `optimizer_name` (optim.name) decides which optimizer kernels can run."""
    ctx = DistContext.from_env()
    choice = select_device(cfg.device)
    device = rank_device(ctx, choice.device)
    reason = f"one GPU per local rank ({ctx.local_rank})" if device != choice.device \
        else choice.reason
    outcomes = [Outcome("device", True, f"{device} ({reason})")]

    prec = cfg.precision
    if prec == "auto":
        bf16_ok, why = precision.supported(device, "bf16")
        prec = "bf16" if bf16_ok else "fp32"
        outcomes.append(Outcome("precision", bf16_ok, f"bf16 autocast ({why})" if bf16_ok
                                else f"fp32 kept: {why}"))
    else:
        ok, why = precision.supported(device, prec)
        if not ok:
            raise LeantrainError(f"plan.precision {prec!r}: cannot be applied here: {why}")
        outcomes.append(Outcome("precision", prec != "fp32", f"{prec} ({why})" if prec != "fp32"
                                else "fp32 requested"))

    strategy = resolve_strategy(cfg.distributed, ctx)
    sharded = strategy == "fsdp"  # FSDP2's DTensor parameters narrow what can run
    cl_check = (False, "FSDP2 shards contiguous parameters only, and channels_last weights are "
                "not contiguous") if sharded else memory_format.supported(device, model)
    cl, out = _choose("channels_last", cfg.channels_last, True, cl_check)
    outcomes.append(out)
    comp, out = _choose("compile", cfg.compile, False, compile.supported(device))
    outcomes.append(out)
    bench, out = _choose("cudnn_benchmark", cfg.cudnn_benchmark, True,
                         backend_flags.supported(device, "cudnn_benchmark"))
    outcomes.append(out)
    tf32, out = _choose("tf32", cfg.tf32, True, backend_flags.supported(device, "tf32"))
    outcomes.append(out)

    impl = optimizer.default_impl(device, optimizer_name, sharded) \
        if cfg.optimizer_impl == "auto" else cfg.optimizer_impl
    ok, why = optimizer.supported(device, impl, optimizer_name, sharded)
    if not ok:
        raise LeantrainError(f"plan.optimizer_impl {impl!r}: cannot be applied here: {why}")
    outcomes.append(Outcome("optimizer_impl", impl != "for-loop", f"{impl} ({why})"))
    accum, out = _accumulation(cfg, tokens_per_batch, ctx.world_size)
    outcomes.append(out)
    ckpt, out = _choose("activation_checkpointing", cfg.activation_checkpointing, False,
                        checkpointing.supported(model))
    outcomes.append(out)
    outcomes.append(Outcome("distributed", strategy is not None,
                            f"{strategy} over {ctx.world_size} process(es), rank {ctx.rank}"
                            if strategy else "one process (start several with leantrain launch)"))
    return ResolvedPlan(device, prec, cl, comp, bench, tf32, impl, accum, outcomes,
                        strategy, ckpt)
