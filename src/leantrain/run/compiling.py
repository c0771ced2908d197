"""A compiled run's step model and its accounting: compile time, recompiles, graph breaks, and
the step count at which compiling pays for itself.

The break-even needs the eager step time of this model on this machine, and measuring it
costs nothing: the run's first `EAGER_STEPS` optimizer steps are real training steps taken
eagerly (the same computation, up to float reassociation) and timed; then the compiled model
takes over. The first compiled step carries the compile and is kept out of samples/s.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..measure import clock
from ..measure.compile_watch import CompileStats, CompileWatch, break_even_steps, describe
from ..techniques.compile import apply_compile, compile_blocks, repeated
from ..techniques.compile_mode import uses_cuda_graphs
from .state import Progress

log = logging.getLogger(__name__)

EAGER_STEPS = 5  # the first of them is a warm-up; the others time the eager baseline
RECOMPILE_WARNING = 2  # one recompile is usually torch marking a dimension dynamic


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompiledStep:
    """Which model takes the next step (eager, then compiled) and what compiling cost."""

    def __init__(self, eager: nn.Module, device: torch.device, eager_steps: int = 0,
                 mode: str = "default", per_block: bool = False):
        self.eager, self.device, self.mode = eager, device, mode
        # FSDP2: the repeated blocks compiled in place (`compile_blocks`), if it has some
        self.blocks = repeated(distributed.blocks(eager)) if per_block else []
        self.cuda_graphs = uses_cuda_graphs(mode, device)
        self.compiled: nn.Module | None = None
        self.eager_steps, self.eager_left = eager_steps, eager_steps
        self.eager_start: float | None = None
        self.eager_step_s: float | None = None
        self.compile_pending = eager_steps == 0
        self.compiled_since: tuple[float, int] | None = None  # (step seconds, steps) then
        self.watch = CompileWatch().start()
        self.warned = False
        self.final: CompileStats | None = None

    @property
    def model(self) -> nn.Module:
        if self.eager_left:
            return self.eager
        if self.compiled is None and self.blocks:
            compile_blocks(self.blocks, self.mode)
            self.compiled = self.eager
        elif self.compiled is None:
            self.compiled = apply_compile(self.eager, self.mode)
        return self.compiled

    def before_forward(self) -> None:
        """Under CUDA graphs: a new step begins, so the graphs may reuse the last step's
        output memory (the trainer keeps nothing of it but detached copies)."""
        if self.cuda_graphs and not self.eager_left:
            torch.compiler.cudagraph_mark_step_begin()

    def kept(self, t: torch.Tensor) -> torch.Tensor:
        """A step output the caller may hold past the next step: under CUDA graphs the next
        replay overwrites the graph's outputs, so it is copied."""
        return t.detach().clone() if self.cuda_graphs and not self.eager_left else t

    def shape_changed(self) -> None:
        """A new micro-batch size (out-of-memory recovery) compiles once more: the next
        step's time is booked as compile time, and compiled steps are timed from after it."""
        if self.compiled is not None:
            self.compile_pending = True
            log.info("torch.compile: the new micro-batch size compiles once more (dynamo then "
                     "marks the batch dimension dynamic); that step counts as compile time")

    def after_step(self, p: Progress, tick: float) -> float:
        """Book the optimizer step that just ended; returns the step clock (`tick`), moved on
        when the time since `tick` was booked here rather than as training steps."""
        if self.eager_left:
            return self._after_eager_step(p, tick)
        now = clock.now()
        if self.compile_pending:  # this step compiled: its time is compile time
            self.compile_pending = False
            p.compile_seconds += now - tick
            self.compiled_since = (p.step_seconds, p.step)
            return now
        self._warn_recompiles()
        return tick

    def _after_eager_step(self, p: Progress, tick: float) -> float:
        self.eager_left -= 1
        _sync(self.device)
        now = clock.now()
        if self.eager_start is None:  # the first step warms up: not timed
            self.eager_start = now
        if self.eager_left:
            return tick
        if self.eager_steps > 1:
            self.eager_step_s = (now - self.eager_start) / (self.eager_steps - 1)
        p.step_seconds += now - tick  # the eager steps are training steps
        self.compile_pending = True
        return now

    def _warn_recompiles(self) -> None:
        if self.warned or self.watch.recompiles < RECOMPILE_WARNING:
            return
        self.warned = True
        reason = Counter(self.watch.reasons).most_common(1)[0][0]
        log.warning("torch.compile has recompiled %d times (most often: %s); each costs a "
                    "compile, and past torch's recompile limit the model runs eagerly. Keep "
                    "shapes and dtypes fixed (pad batches to one length; full batches only) "
                    "or mark the changing dimension dynamic",
                    self.watch.recompiles, reason)

    def close(self) -> CompileStats:
        if self.final is None:
            self.final = self.watch.stop()
        return self.final

    def report(self, p: Progress) -> dict[str, Any]:
        """The summary's "compile" entry (call `close` first)."""
        stats = self.close()
        found: dict[str, Any] = {"seconds": p.compile_seconds, **stats.to_dict(),
                                 "eager_step_seconds": self.eager_step_s,
                                 "compiled_step_seconds": None, "break_even_steps": None}
        if self.compiled_since is None:
            found["note"] = (f"not compiled: the run ended within the {self.eager_steps} eager "
                             "steps that time the baseline" if self.eager_steps else
                             "not compiled: no step was taken")
            return found
        seconds, steps = p.step_seconds - self.compiled_since[0], p.step - self.compiled_since[1]
        if steps > 0 and seconds > 0:
            compiled = seconds / steps
            found["compiled_step_seconds"] = compiled
            if self.eager_step_s is not None:
                found["speedup"] = self.eager_step_s / compiled
                # the compile step also took one step's work: the rest was compiling
                found["break_even_steps"] = break_even_steps(p.compile_seconds - compiled,
                                                             self.eager_step_s, compiled)
        found["description"] = describe(found)
        return found
