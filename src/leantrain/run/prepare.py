"""`prepare`: the resolved plan applied to a hand-written training loop.

For users who keep their own loop: the same decisions `leantrain train` makes (device,
precision, memory format, compile, activation checkpointing, backend flags), applied to plain
objects that are then used the plain PyTorch way::

    run = leantrain.prepare(model, optimizer, loader)
    for batch in run.batches():          # any structure, on the device
        with run.autocast():
            loss = model_loss(run.model, batch)
        run.backward(loss)               # loss scaling under fp16
        run.step()                       # optimizer step (+ scaler), zero_grad

The optimizer is used as you built it (its kernels and hyper-parameters are yours); the plan's
`optimizer_impl` applies only to optimizers leantrain builds. The plan settings that need an
optimizer of leantrain's own (`optimizer_states` other than fp32, `optimizer_offload`) are
refused here, rather than changing the weights under an optimizer not made for them. Under
CUDA graphs (`compile_mode` reduce-overhead or max-autotune on a GPU), `run.step()` marks the
next step's beginning. `run.outcomes` says what was applied and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PlanConfig, config_from_dict
from ..errors import LeantrainError
from ..techniques import cudnn_benchmark, precision, tf32
from ..techniques.compile import apply_compile
from ..techniques.compile_mode import uses_cuda_graphs
from .plan import ResolvedPlan, prepare_model, resolve_plan
from .step import to_device


@dataclass
class Prepared:
    model: nn.Module  # on the device, in the plan's layout (compiled if the plan says so)
    optimizer: torch.optim.Optimizer | None
    loader: Iterable | None
    plan: ResolvedPlan
    scaler: torch.amp.GradScaler | None = None
    _flags: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def outcomes(self) -> dict[str, str]:
        found = {o.name: o.describe() for o in self.plan.outcomes}
        if "optimizer_impl" in found:  # the plan's kernels are for optimizers leantrain builds
            found["optimizer_impl"] = _your_optimizer(self.optimizer)
        return found

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.plan.autocast()

    def to_device(self, batch: Any) -> Any:
        return to_device(batch, self.plan.device, self.plan.channels_last)

    def batches(self, loader: Iterable | None = None) -> Iterator[Any]:
        """The loader's batches (tensors, tuples, dicts, nested) on the plan's device."""
        for batch in loader if loader is not None else self.loader:
            yield self.to_device(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        precision.optimizer_step(self.optimizer, self.scaler)
        if self.plan.compile and uses_cuda_graphs(self.plan.compile_mode, self.plan.device):
            torch.compiler.cudagraph_mark_step_begin()  # the next forward starts a new step

    def close(self) -> None:
        """Restore the process-wide backend flags (cuDNN benchmark, TF32) the plan set."""
        self._flags.close()


def _your_optimizer(optimizer: torch.optim.Optimizer | None) -> str:
    if optimizer is None:
        return "not applied: no optimizer given"
    flags = {k: optimizer.defaults.get(k) for k in ("fused", "foreach")}
    kernels = ", ".join(f"{k}={v}" for k, v in flags.items() if v is not None) or \
        "its own default kernels"
    return (f"not applied: your {type(optimizer).__name__} runs as you built it ({kernels}); "
            "the plan's optimizer kernels apply to optimizers leantrain builds")


def _refuse_optimizer_settings(plan: PlanConfig) -> None:
    """Settings that only an optimizer leantrain builds can honour (bf16 states would cast
    the weights under an optimizer without stochastic rounding)."""
    if plan.optimizer_states not in ("auto", "fp32"):
        raise LeantrainError(
            f"plan.optimizer_states {plan.optimizer_states!r} needs the optimizer leantrain "
            "builds (torchao's); with your own loop build it yourself (leantrain.techniques."
            "optimizer_states.torchao_optimizer) and leave plan.optimizer_states unset")
    if plan.optimizer_offload:
        raise LeantrainError("plan.optimizer_offload needs the optimizer leantrain builds; "
                             "with your own loop wrap yours in torchao.optim."
                             "CPUOffloadOptimizer and leave plan.optimizer_offload unset")


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            loader: Iterable | None = None, plan: PlanConfig | dict | None = None) -> Prepared:
    """Resolve `plan` (a PlanConfig, a dict of plan.* keys, or the defaults) for this machine
    and model, and apply it. Raises LeantrainError when an explicit request cannot run here."""
    if not isinstance(plan, PlanConfig):
        plan = config_from_dict({"plan": dict(plan or {})}).plan
    _refuse_optimizer_settings(plan)
    resolved = resolve_plan(plan, model)
    model = prepare_model(model, resolved)  # moves parameters in place: the optimizer's too
    step_model = apply_compile(model, resolved.compile_mode) if resolved.compile else model
    prepared = Prepared(step_model, optimizer, loader, resolved,
                        precision.make_grad_scaler(resolved.device, resolved.precision))
    if resolved.device.type == "cuda":
        prepared._flags.enter_context(cudnn_benchmark.enabled(resolved.cudnn_benchmark))
        prepared._flags.enter_context(tf32.enabled(resolved.tf32))
    return prepared
