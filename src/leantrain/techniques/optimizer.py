"""Fused and foreach optimizer implementations.

The textbook optimizer step loops over parameters in Python and launches several small kernels
per tensor. `foreach` batches the same math over all tensors at once; `fused` does the whole
update in one kernel per group of tensors. Same algorithm, so lossless up to float rounding;
the gain grows with the number of parameter tensors and is largest on GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import OptimConfig, PlanConfig
from ..errors import LeantrainError
from .base import Context, Outcome, require
from .variant import Variant

NAME = "optimizer_impl"
LOSSLESS = True
VARIANTS = (
    Variant("foreach optimizer", {"plan": {"optimizer_impl": "foreach"}}),
    Variant("fused optimizer", {"plan": {"optimizer_impl": "fused"}}),
)
IMPLS = ("fused", "foreach", "for-loop")


def _fused_devices() -> list[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: fused kernels were CUDA-only
        return ["cuda"]


def check(ctx: Context, impl: str) -> tuple[bool, str]:
    """The optimizer (optim.name) and FSDP2's sharded parameters narrow the answer."""
    device = ctx.device
    if impl == "fused" and device.type not in _fused_devices():
        return False, f"this torch has no fused optimizer kernels for {device.type}"
    if impl == "fused" and ctx.sharded and ctx.optimizer == "sgd":
        return False, "fused SGD has no kernel for FSDP2's sharded (DTensor) parameters"
    if impl not in IMPLS:
        return False, f"unknown implementation {impl!r}; allowed: {', '.join(IMPLS)}"
    return True, f"{impl} kernels available on {device.type}"


def decide(ctx: Context, plan: PlanConfig) -> tuple[str, Outcome]:
    """"auto" is fused where this torch has the kernels, else foreach."""
    impl = plan.optimizer_impl
    if impl == "auto":
        impl = "fused" if check(ctx, "fused")[0] else "foreach"
    why = require(NAME, impl, check(ctx, impl))
    return impl, Outcome(NAME, impl != "for-loop", f"{impl} ({why})")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, impl: str = "for-loop",
    states: str = "fp32", offload: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, with the given kernel implementation; with 8bit, 4bit or
    bf16 `states`, torchao's Adam/AdamW for them (its own kernels: `impl` does not apply);
    `offload`ed, stepping on the CPU with fused CPU kernels (torchao's CPUOffloadOptimizer)."""
    cfg = cfg.resolved()
    if states != "fp32":
        from .optimizer_states import torchao_optimizer

        return torchao_optimizer(params, cfg.name, states, cfg.lr, cfg.weight_decay)
    cls, kwargs = _torch_optimizer(cfg)
    if offload:  # the step runs on the host: the CPU's fused kernels, whatever `impl` says
        from .optimizer_offload import offloaded_optimizer

        return offloaded_optimizer(params, cls, **kwargs, fused=True)
    if impl == "for-loop":
        flags = {"foreach": False}
    elif impl == "foreach":
        flags = {"foreach": True}
    else:
        flags = {"fused": True}
    return cls(params, **kwargs, **flags)


def _torch_optimizer(cfg: OptimConfig) -> tuple[type, dict]:
    """The torch optimizer class `cfg` names and its arguments."""
    if cfg.name == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum,
                                 "nesterov": cfg.nesterov and cfg.momentum > 0,
                                 "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw":
        return torch.optim.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "adam":
        return torch.optim.Adam, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    raise LeantrainError(f"optim.name {cfg.name!r} is not one of sgd, adamw, adam")


def switch_kernels(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Step an optimizer being trained with other kernels from now on, its state kept: through
    its own state_dict, so torch places each state (Adam's step count: on the device for fused
    kernels) as the new kernels need it."""
    if impl not in IMPLS:
        raise LeantrainError(f"unknown implementation {impl!r}; allowed: {', '.join(IMPLS)}")
    flags = {"fused": impl == "fused" or None, "foreach": impl == "foreach" if impl != "fused"
             else None}
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        group.update(flags)
    optimizer.load_state_dict(saved)
    optimizer._step_supports_amp_scaling = impl == "fused"  # (as its constructor sets it)

