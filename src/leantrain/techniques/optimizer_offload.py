"""Optimizer offload: the optimizer's states and step on the CPU, the model on one GPU
(torchao's `CPUOffloadOptimizer`).

Adam keeps 8 bytes of fp32 moments per parameter on the GPU; offloaded, they live in host
memory and the step runs there (torch's fused CPU AdamW), which frees that GPU memory for a
bigger model or batch. Each gradient is copied to pinned host memory on a side stream as soon
as backward produces it, and each updated weight copied back, so the transfers overlap the
backward pass; tensors under 4096 values stay on the GPU with an on-device optimizer. The
cost is the CPU step and the PCIe traffic: it pays only where memory, not speed, is the limit.
The same update (fp32 states), so lossless up to float rounding. Opt-in.

Refused, with the reason: off CUDA (there is nothing to offload), under `leantrain launch`
(FSDP2 shards the states instead), with gradient clipping (the gradients are copied to the host
in backward, before a clip could change them), with fp16 loss scaling, and together with
low-bit or bf16 states.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import PlanConfig
from .base import Context, Outcome, switch
from .variant import Variant

NAME = "optimizer_offload"
LOSSLESS = True
VARIANTS = (Variant("optimizer offloaded to the CPU", {"plan": {"optimizer_offload": True}}),)
MINIMAL_SIZE = 4096  # torchao keeps smaller tensors (and their states) on the GPU


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if ctx.device.type != "cuda":
        return False, (f"offloading moves the optimizer from a CUDA GPU to the CPU; this "
                       f"device is {ctx.device.type}")
    if ctx.strategy is not None:
        return False, (f"torchao's CPU offload is for one GPU; under launch ({ctx.strategy}) "
                       "plan.distributed=fsdp shards the states instead")
    if ctx.clip_norm is not None:
        return False, ("gradients are copied to the CPU during backward, before "
                       "train.clip_norm could clip them; drop clipping to offload")
    try:
        from torchao.optim import CPUOffloadOptimizer  # noqa: F401
    except ImportError as exc:
        return False, f"torchao's CPUOffloadOptimizer cannot be imported: {exc}"
    return True, "optimizer states and step on the CPU (torchao CPUOffloadOptimizer)"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """Opt-in: it trades step time for GPU memory, which only the user can weigh."""
    if plan.optimizer_offload and plan.optimizer_states not in ("auto", "fp32"):
        return switch(NAME, True, False, (False, f"offload keeps fp32 states; plan."
                                                 f"optimizer_states is {plan.optimizer_states}"))
    if plan.optimizer_offload and plan.precision == "fp16":
        return switch(NAME, True, False, (False, "fp16's GradScaler is not wired through the "
                                                 "offloaded step; use bf16"))
    return switch(NAME, plan.optimizer_offload, False, check(ctx))


def offloaded_optimizer(params: Iterable[torch.nn.Parameter], optimizer_class: type,
                        **kwargs) -> torch.optim.Optimizer:
    """`optimizer_class(**kwargs)` stepping on the CPU for the parameters of a CUDA model."""
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, optimizer_class, offload_gradients=False,
                               minimal_size=MINIMAL_SIZE, **kwargs)
