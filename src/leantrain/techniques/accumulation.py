"""Gradient accumulation: sum gradients of k micro-batches, then take one optimizer step.

Trains with an effective batch of k × batch_size while holding only one micro-batch of
activations, so a large batch fits in a small memory. Each micro-batch loss is divided by k so
the summed gradient equals the large batch's mean gradient: lossless for models without
batch-statistics layers (BatchNorm sees micro-batches). Costs k forward/backward passes per
step, so it buys memory, not speed.
"""

from __future__ import annotations

import torch

from ..config import PlanConfig
from ..errors import LeantrainError
from .base import Context, Outcome

NAME = "grad_accum"
LOSSLESS = True
VARIANTS = ()
BENCH_NOTE = "buys memory, not speed (k passes per step); not a speed-up to rank"


def check(ctx: Context, micro_batches: int) -> tuple[bool, str]:
    if micro_batches < 1:
        return False, f"needs at least one micro-batch per step, got {micro_batches}"
    return True, "works on every device"


def decide(ctx: Context, plan: PlanConfig) -> tuple[int, Outcome]:
    """plan.grad_accum, or enough micro-batches to reach plan.tokens_per_step."""
    if plan.tokens_per_step is None:
        n = plan.grad_accum
        return n, Outcome(NAME, n > 1, f"{n} micro-batches per step" if n > 1
                          else "one batch per step")
    tokens = ctx.tokens_per_batch
    if tokens is None:
        raise LeantrainError("plan.tokens_per_step is for language models (data.context set); "
                             "use plan.grad_accum for other models")
    if plan.grad_accum != 1:
        raise LeantrainError("set plan.grad_accum or plan.tokens_per_step, not both "
                             f"(got {plan.grad_accum} and {plan.tokens_per_step})")
    per_micro = tokens * ctx.processes
    n = max(1, round(plan.tokens_per_step / per_micro))
    return n, Outcome(NAME, n > 1, f"{n} micro-batch(es) of {tokens:,} tokens "
                      f"x {ctx.processes} process(es) = {n * per_micro:,} tokens per step "
                      f"(plan.tokens_per_step {plan.tokens_per_step:,})")


def scale_loss(loss: torch.Tensor, accum: int) -> torch.Tensor:
    """The micro-batch loss to backpropagate so that k of them sum to the mean."""
    return loss / accum if accum > 1 else loss


def is_step_boundary(micro_index: int, accum: int, last_in_epoch: bool) -> bool:
    """Step after every k-th micro-batch, and at the end of an epoch (a short last group)."""
    return (micro_index + 1) % accum == 0 or last_in_epoch
