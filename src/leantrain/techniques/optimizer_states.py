"""Optimizer-state precision: Adam/AdamW moments in 8 or 4 bits (torchao's low-bit optimizers),
or weights and moments in bf16 updated with stochastic rounding.

Adam keeps two fp32 moments per parameter, 8 bytes, twice the weights themselves; on a large
model they are often the biggest share of training memory. torchao's `AdamW8bit` and
`AdamW4bit` store them block-quantized (8-bit: about a quarter of the fp32 bytes, 4-bit: an
eighth), dequantizing inside the step. Lossy: the updates change slightly, so the loss curve
must be checked, and the saving only matters where memory is what limits the batch or the
model size. Never chosen by "auto" (fp32 stays): ask with `plan.optimizer_states=8bit`.
SGD's momentum is not covered (torchao's low-bit optimizers are Adam-family).

`bf16` keeps the weights themselves in bf16 (so their gradients and AdamW's moments are bf16
too: 8 bytes per parameter instead of 16) and trains under bf16 autocast. A bf16 weight cannot
take an update smaller than half its spacing (1/256 of its value): rounded to nearest, small
updates vanish and training stalls. torchao's AdamW rounds each update stochastically instead,
up or down with the probabilities that make it exact on average, so small updates still add
up. The final weights are bf16. It needs bf16 autocast (plan.precision bf16, or auto where bf16
is native) and AdamW (torchao's implementation).

Measured on the text-gpt recipe (1.85 M parameters, AdamW, 2 epochs on 400 kB, bf16 autocast
for all, 5 seeds; `benchmarks/optimizer_states.py` on the 2-core Intel Xeon with AMX): state
bytes 0.50x fp32 for bf16, 0.26x for 8-bit, 0.14x for 4-bit; samples/s 0.86x (95% interval
0.77-0.92), 0.75x (0.73-0.79), 0.73x (0.73-0.76): on a CPU the quantized step costs more than
it saves, since memory was not the limit. Held-out bits per byte against fp32 moments on the
same seed: bf16 +0.008 (-0.016 to +0.032), 8-bit -0.002 (-0.034 to +0.031), 4-bit -0.063
(-0.083 to -0.042, lower in this short run at a high learning rate; not a general claim).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PlanConfig
from ..env import bf16_supported, compiler_available
from . import precision
from .base import Context, Outcome, require
from .variant import Variant

NAME = "optimizer_states"
LOSSLESS = False
VARIANTS = (
    Variant("8-bit optimizer states", {"plan": {"optimizer_states": "8bit"}}, lossless=False),
    Variant("4-bit optimizer states", {"plan": {"optimizer_states": "4bit"}}, lossless=False),
    Variant("bf16 weights and states", {"plan": {"optimizer_states": "bf16"}}, lossless=False),
)
STATES = ("fp32", "bf16", "8bit", "4bit")
ADAM_FAMILY = ("adam", "adamw")


def check(ctx: Context, states: str) -> tuple[bool, str]:
    if states == "fp32":
        return True, "fp32 moments"
    if states not in STATES:
        return False, f"unknown optimizer states {states!r}; allowed: {', '.join(STATES)}"
    if states == "bf16" and ctx.optimizer != "adamw":
        return False, (f"bf16 states use torchao's AdamW with stochastic rounding; optim.name "
                       f"is {ctx.optimizer} (use adamw)")
    if ctx.optimizer not in ADAM_FAMILY:
        return False, (f"low-bit states are for Adam and AdamW (torchao); optim.name is "
                       f"{ctx.optimizer}")
    if states == "bf16" and not bf16_supported(ctx.device)[0]:
        return False, f"bf16 weights need native bf16: {bf16_supported(ctx.device)[1]}"
    if ctx.sharded:
        return False, "low-bit states with FSDP2's sharded parameters are not tested here"
    try:
        import torchao.optim  # noqa: F401
    except ImportError as exc:
        return False, f"torchao's low-bit optimizers cannot be imported: {exc}"
    compiles, why = compiler_available()
    if not compiles:  # torchao compiles its quantized step with torch.compile
        return False, f"torchao's low-bit step is compiled with torch.compile: {why}"
    if states == "bf16":
        return True, "bf16 weights and AdamW moments, stochastic rounding (torchao)"
    return True, f"torchao {states} Adam moments (block-quantized)"


def decide(ctx: Context, plan: PlanConfig) -> tuple[str, Outcome]:
    """"auto" keeps fp32: low-bit states change the updates, so they are only used when asked."""
    if plan.optimizer_states == "auto":
        return "fp32", Outcome(NAME, False, "fp32 moments (low-bit states are lossy: ask for "
                               "them with plan.optimizer_states=8bit or 4bit)")
    states = plan.optimizer_states
    why = require(NAME, states, check(ctx, states))
    if states == "bf16":
        autocast = precision.decide(ctx, plan)[0]
        if autocast != "bf16":
            require(NAME, states, (False, f"bf16 weights train under bf16 autocast; "
                                          f"plan.precision is {plan.precision} ({autocast} here)"))
    return states, Outcome(NAME, states != "fp32", why)


def torchao_optimizer(params, name: str, states: str, lr: float, weight_decay: float
                      ) -> torch.optim.Optimizer:
    """torchao's Adam or AdamW with `states` (8bit or 4bit) moments, or its AdamW with
    stochastic rounding for bf16 weights (`states` bf16)."""
    from torchao import optim as low_bit

    if states == "bf16":  # torchao's documented entry for bf16 training, underscore and all
        return low_bit._AdamW(params, lr=lr, weight_decay=weight_decay,
                              bf16_stochastic_round=True)

    classes = {("adamw", "8bit"): low_bit.AdamW8bit, ("adamw", "4bit"): low_bit.AdamW4bit,
               ("adam", "8bit"): low_bit.Adam8bit, ("adam", "4bit"): low_bit.Adam4bit}
    return classes[name, states](params, lr=lr, weight_decay=weight_decay)


def apply_bf16_weights(model: nn.Module) -> nn.Module:
    """The model's parameters and buffers in bf16, in place (before its optimizer is built)."""
    return model.to(torch.bfloat16)


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
