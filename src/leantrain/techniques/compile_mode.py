"""torch.compile's mode: how hard Inductor searches for fast kernels, and whether a step is
replayed as CUDA graphs.

- `default`: Inductor's fused kernels, compiled once (seconds to a minute).
- `max-autotune`: for every matmul and convolution, Inductor benchmarks several kernel
  configurations (Triton and CUTLASS templates on a GPU, C++ GEMM templates on a CPU) and keeps
  the fastest; on a GPU it also replays the step as CUDA graphs. Compiling takes minutes, so it
  pays only for long runs with large matmuls.
- `max-autotune-no-cudagraphs`: the same search without CUDA graphs.
- `reduce-overhead`: records the step's kernels into CUDA graphs and replays them: the host no
  longer launches each kernel, which is what bounds small models and small batches on a fast
  GPU. It needs a CUDA device and fixed shapes (each new shape records a new graph), and keeps
  the graphs' memory pool.

CUDA graphs are refused under `leantrain launch` (DDP's and FSDP2's communication hooks are
not captured here) and off CUDA, with the reason. The mode is opt-in (compile itself is
measured by default, in the default mode): the bench measures each mode with its compile time
counted, and the break-even says how long a run must be for it to pay.
"""

from __future__ import annotations

import torch

from ..config import PlanConfig
from .base import Context, Outcome, require
from .variant import Variant

NAME = "compile_mode"
LOSSLESS = True
MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
CUDA_GRAPHS = ("max-autotune", "reduce-overhead")
VARIANTS = tuple(
    Variant(f"compile ({mode})", {"plan": {"compile": True, "compile_mode": mode}})
    for mode in ("max-autotune", "reduce-overhead"))


def check(ctx: Context, mode: str) -> tuple[bool, str]:
    if mode not in MODES:
        return False, f"unknown compile mode {mode!r}; allowed: {', '.join(MODES)}"
    if mode not in CUDA_GRAPHS:
        return True, f"Inductor's {mode} mode"
    if mode == "reduce-overhead" and ctx.device.type != "cuda":
        return False, f"CUDA graphs need a CUDA device; this device is {ctx.device.type}"
    if ctx.device.type == "cuda" and ctx.strategy is not None:
        return False, (f"{mode} replays CUDA graphs, not captured here with {ctx.strategy}'s "
                       "communication hooks; use max-autotune-no-cudagraphs")
    graphs = "; steps replay as CUDA graphs" if ctx.device.type == "cuda" else \
        " (no CUDA graphs off a GPU)"
    return True, f"Inductor's {mode} mode{graphs}"


def decide(ctx: Context, plan: PlanConfig) -> tuple[str, Outcome]:
    """The mode asked for; it must run here, and only matters when compiling."""
    mode = plan.compile_mode
    if mode != "default" and plan.compile is False:
        require(NAME, mode, (False, "it only applies with plan.compile true or auto"))
    why = require(NAME, mode, check(ctx, mode))
    return mode, Outcome(NAME, plan.compile is True and mode != "default",
                         why if plan.compile is True else "not compiling")


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    return mode in CUDA_GRAPHS and device.type == "cuda"


def torch_mode(mode: str) -> str | None:
    """The `mode` argument of torch.compile."""
    return None if mode == "default" else mode
