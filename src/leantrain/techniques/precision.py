"""Mixed precision: bf16 autocast (CPU and GPU), fp16 autocast with a GradScaler (GPU), or
fp8 training (torchao float8, GPUs of compute capability >= 8.9).

Matmuls and convolutions run in 16 bits with fp32 master weights, which roughly halves memory
traffic and, on hardware with native 16-bit units (tensor cores, AVX-512 BF16 / AMX), speeds
them up. Lossy: the numbers change, so the accuracy of a run must be checked. Hurts on CPUs
without native bf16, where bf16 is emulated; fp16 needs loss scaling to avoid gradient
underflow, which is why it is offered on GPUs only.

fp8 converts the model's eligible Linear layers to torchao's `Float8Linear` (their matmuls in
fp8 with dynamic scales, tensorwise or rowwise) and runs the rest under bf16 autocast. By a
stated rule, the first and the last Linear layer stay in bf16 (the embedding-side and output
layers are the most sensitive to precision), as does any Linear whose dimensions are not
multiples of 16 (what fp8 matmuls require). It pays only when the matmuls are large: on
small models the casts and scale computations cost more than fp8 saves, so measure it
(`leantrain bench` lists it where it can run, and "unsupported here" with the reason where
it cannot).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from ..config import PlanConfig
from ..env import bf16_supported, fp8_supported
from .base import Context, Outcome, require
from .memory_format import has_conv2d
from .variant import Variant

NAME = "precision"
LOSSLESS = False
VARIANTS = (
    Variant("bf16", {"plan": {"precision": "bf16"}}, lossless=False),
    Variant("fp16", {"plan": {"precision": "fp16"}}, lossless=False),
    Variant("fp8", {"plan": {"precision": "fp8"}}, lossless=False),
)
# the autocast dtype; under fp8 the layers left out of fp8 run in bf16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16,
          "fp8-rowwise": torch.bfloat16}
FP8_RECIPES = {"fp8": "tensorwise", "fp8-rowwise": "rowwise"}
FP8_MULTIPLE = 16  # fp8 matmuls need both dimensions divisible by 16


def check(ctx: Context, precision: str) -> tuple[bool, str]:
    device = ctx.device
    if precision == "fp32":
        return True, "full precision"
    if precision == "bf16":
        return bf16_supported(device)
    if precision == "fp16":
        if device.type == "cuda":
            return True, "fp16 autocast with dynamic loss scaling"
        return False, f"fp16 with loss scaling is GPU-only; on {device.type} use bf16"
    if precision in FP8_RECIPES:
        supported, why = fp8_supported(device)
        if supported and not float8_layers(ctx.model):
            return False, (f"no Linear layer qualifies for fp8 (the first and last stay in "
                           f"bf16; both dimensions must be multiples of {FP8_MULTIPLE})")
        return supported, why
    return False, f"unknown precision {precision!r}; allowed: fp32, bf16, fp16, fp8, fp8-rowwise"


def decide(ctx: Context, plan: PlanConfig) -> tuple[str, Outcome]:
    """"auto" is bf16 where the device runs it natively, except on a CPU for a model without
    convolutions: there the casts around small matmuls cost as much as bf16 saves or more
    (`benchmarks/precision_rule.py` on a 2-core EPYC: a tiny BERT 0.97x in bf16, 95% interval
    0.84-1.11x, against 1.46x for the digits CNN; on a 2-core AMX Xeon, whole runs in
    `benchmarks/results/default_plan.json`: bf16 at 0.80-0.90x fp32 for the tiny BERT and
    1.78x for the digits CNN). A rule can lose: `run.defaults` measures it on runs long enough
    to pay. bf16 weights (plan.optimizer_states=bf16) always take bf16 autocast."""
    if plan.precision == "auto":
        native, why = check(ctx, "bf16")
        if native and plan.optimizer_states == "bf16":
            return "bf16", Outcome(NAME, True, f"bf16 autocast: the weights are bf16 "
                                   f"(plan.optimizer_states=bf16; {why})")
        if native and ctx.device.type == "cpu" and not has_conv2d(ctx.model):
            return "fp32", Outcome(NAME, False, "fp32 kept: on CPU bf16 autocast pays for "
                                   "convolutions, and this model has none")
        if native:
            return "bf16", Outcome(NAME, True, f"bf16 autocast ({why})")
        return "fp32", Outcome(NAME, False, f"fp32 kept: {why}")
    why = require(NAME, plan.precision, check(ctx, plan.precision))
    if plan.precision == "fp32":
        return "fp32", Outcome(NAME, False, "fp32 requested")
    return plan.precision, Outcome(NAME, True, f"{plan.precision} ({why})")


def float8_layers(model: torch.nn.Module) -> list[str]:
    """The Linear layers fp8 converts: all but the first and the last, with both dimensions
    multiples of FP8_MULTIPLE."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    return [name for name, m in linears[1:-1]
            if m.in_features % FP8_MULTIPLE == 0 and m.out_features % FP8_MULTIPLE == 0]


def apply_float8(model: torch.nn.Module, precision: str = "fp8") -> list[str]:
    """Convert `model`'s `float8_layers` in place to torchao's Float8Linear with the recipe of
    `precision` (fp8: tensorwise, fp8-rowwise: rowwise); returns the converted names. Before
    torch.compile and FSDP2 wrapping, as torchao asks."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = set(float8_layers(model))
    config = Float8LinearConfig.from_recipe_name(FP8_RECIPES[precision])
    convert_to_float8_training(model, config=config,
                               module_filter_fn=lambda module, fqn: fqn in chosen)
    return sorted(chosen)


def autocast_factory(device: torch.device | str, precision: str
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """What builds the context to run forward passes (and the loss) in, each time it is used."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=torch.device(device).type,
                             dtype=DTYPES[precision])


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context to run forward passes (and the loss) in, e.g. `autocast("cpu", "bf16")`."""
    return autocast_factory(device, precision)()


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA; None where no loss scaling is needed."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
                   ) -> None:
    """Step the optimizer (through the GradScaler under fp16, which skips steps whose
    gradients overflowed), then clear the gradients."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
