"""Optimizer-state precision: Adam/AdamW moments in 8 or 4 bits (torchao's low-bit optimizers).

Adam keeps two fp32 moments per parameter, 8 bytes, twice the weights themselves; on a large
model they are often the biggest share of training memory. torchao's `AdamW8bit` and
`AdamW4bit` store them block-quantized (8-bit: about a quarter of the fp32 bytes, 4-bit: an
eighth), dequantizing inside the step. Lossy: the updates change slightly, so the loss curve
must be checked, and the saving only matters where memory is what limits the batch or the
model size. Never chosen by "auto" (fp32 stays): ask with `plan.optimizer_states=8bit`.
SGD's momentum is not covered (torchao's low-bit optimizers are Adam-family).
"""

from __future__ import annotations

import torch

from ..config import PlanConfig
from ..env import compiler_available
from .base import Context, Outcome, require
from .variant import Variant

NAME = "optimizer_states"
LOSSLESS = False
VARIANTS = (
    Variant("8-bit optimizer states", {"plan": {"optimizer_states": "8bit"}}, lossless=False),
    Variant("4-bit optimizer states", {"plan": {"optimizer_states": "4bit"}}, lossless=False),
)
STATES = ("fp32", "8bit", "4bit")
ADAM_FAMILY = ("adam", "adamw")


def check(ctx: Context, states: str) -> tuple[bool, str]:
    if states == "fp32":
        return True, "fp32 moments"
    if states not in STATES:
        return False, f"unknown optimizer states {states!r}; allowed: {', '.join(STATES)}"
    if ctx.optimizer not in ADAM_FAMILY:
        return False, (f"low-bit states are for Adam and AdamW (torchao); optim.name is "
                       f"{ctx.optimizer}")
    if ctx.sharded:
        return False, "low-bit states with FSDP2's sharded parameters are not tested here"
    try:
        import torchao.optim  # noqa: F401
    except ImportError as exc:
        return False, f"torchao's low-bit optimizers cannot be imported: {exc}"
    compiles, why = compiler_available()
    if not compiles:  # torchao compiles its quantized step with torch.compile
        return False, f"torchao's low-bit step is compiled with torch.compile: {why}"
    return True, f"torchao {states} Adam moments (block-quantized)"


def decide(ctx: Context, plan: PlanConfig) -> tuple[str, Outcome]:
    """"auto" keeps fp32: low-bit states change the updates, so they are only used when asked."""
    if plan.optimizer_states == "auto":
        return "fp32", Outcome(NAME, False, "fp32 moments (low-bit states are lossy: ask for "
                               "them with plan.optimizer_states=8bit or 4bit)")
    why = require(NAME, plan.optimizer_states, check(ctx, plan.optimizer_states))
    return plan.optimizer_states, Outcome(NAME, plan.optimizer_states != "fp32", why)


def low_bit_optimizer(params, name: str, states: str, lr: float, weight_decay: float
                      ) -> torch.optim.Optimizer:
    """torchao's Adam or AdamW with `states` (8bit or 4bit) moments."""
    from torchao import optim as low_bit

    classes = {("adamw", "8bit"): low_bit.AdamW8bit, ("adamw", "4bit"): low_bit.AdamW4bit,
               ("adam", "8bit"): low_bit.Adam8bit, ("adam", "4bit"): low_bit.Adam4bit}
    return classes[name, states](params, lr=lr, weight_decay=weight_decay)


def _tensor_bytes(value) -> int:
    """Bytes a state tensor holds, through tensor subclasses (torchao's quantized states)."""
    if not isinstance(value, torch.Tensor):
        return 0
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, n)) for n in names)
    return value.numel() * value.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state (moments, steps), as stored."""
    return sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values())
