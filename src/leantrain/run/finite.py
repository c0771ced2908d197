"""The finite check: NaN or inf in the training loss, the weights or the buffers stops the run.

It runs where the run already waits on the device (the loss at log steps and epoch ends) and
before every checkpoint (the weights and floating-point buffers, such as BatchNorm's running
statistics), so it costs no extra host sync in the hot path and no checkpoint, nor `model.pt`,
ever holds a non-finite value: the last finite checkpoint is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..distributed import DistContext
from ..errors import LeantrainError

FIXES = ("usual fixes: a lower optim.lr, plan.precision=fp32 (no 16-bit overflow), "
         "train.clip_norm=1.0 (gradient clipping), or inputs scaled to a sane range")


class NonFiniteError(LeantrainError):
    """Training produced NaN or inf; the message names the step and the first such quantity."""


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard (DTensor)


def first_bad_parameter(model: nn.Module, dist: DistContext) -> str | None:
    """"parameter NAME" or "buffer NAME" of the first parameter or floating-point buffer
    holding NaN or inf (one host sync when all are finite); under launch, a bad shard on any
    rank counts."""
    params = [(f"parameter {name}", _local(p).detach()) for name, p in model.named_parameters()]
    params += [(f"buffer {name}", _local(b).detach()) for name, b in model.named_buffers()
               if b.is_floating_point()]
    if not params:
        return None
    flags = torch.stack([torch.isfinite(p).all() for _, p in params])
    bad = (~flags).float().sum().reshape(1)
    if dist.active:
        bad = distributed.all_reduce_sum([bad], dist, everywhere=True)[0]
    if float(bad.item()) == 0:
        return None
    local = [name for (name, _), ok in zip(params, flags.tolist(), strict=True) if not ok]
    return local[0] if local else "a parameter or buffer sharded on another rank"


def check_loss(loss: float, step: int, last_good: str) -> None:
    if not math.isfinite(loss):
        raise NonFiniteError(f"step {step}: the training loss is {loss} (not finite); training "
                             f"stopped. {last_good}; {FIXES}")


def check_parameters(model: nn.Module, dist: DistContext, step: int, last_good: str) -> None:
    name = first_bad_parameter(model, dist)
    if name is not None:
        raise NonFiniteError(f"step {step}: {name} holds NaN or inf; training "
                             f"stopped. {last_good}; {FIXES}")
