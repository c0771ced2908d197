"""Out-of-memory recovery: a step that does not fit is replayed as smaller micro-batches.

A CUDA out-of-memory error in a training step drops the step's partial gradients and tallies
and replays its loader batches, each cut into twice as many micro-batches whose gradients
accumulate, so the global batch (and the run) is the one it would have been; bounded at one
sample per micro-batch. The split is logged once per doubling and kept by the checkpoint.

Memory comes back first. While an exception is handled, its traceback keeps every frame of
the failed call alive, and with them the failed forward's activations: a retry inside the
`except` block runs beside them and runs out again. So a failure is read down to its message
inside the block and the retry runs after it (`attempt`), once the garbage collector and the
allocator's cache have given the memory back (`release`).

Under torch.compile a new micro-batch size compiles once more (dynamo then marks the batch
dimension dynamic, so a later split does not); the trainer books that step as compile time.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..data.loaders import batch_size
from ..distributed import DistContext
from ..errors import LeantrainError, first_line
from .state import Progress, TrainState

log = logging.getLogger(__name__)

T = TypeVar("T")


def attempt(call: Callable[[], T]) -> tuple[T, None] | tuple[None, str]:
    """(call(), None), or (None, the first line of its out-of-memory error). Nothing of a
    failed call (exception, traceback, frames, their tensors) outlives this function."""
    try:
        return call(), None
    except torch.OutOfMemoryError as error:
        message = first_line(error) or "out of memory"
    return None, message


def release(device: torch.device) -> None:
    """Give a failed attempt's memory back: frames caught in a reference cycle are collected,
    then the allocator returns its cached blocks (a retry of another shape may need them)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class StepWindow:
    """The loader batches of the optimizer step in progress (from micro-batch `first`) and the
    epoch's tallies before it: what a replay needs."""

    batches: list[Any] = field(default_factory=list)
    first: int = 0
    sums: list[torch.Tensor] = field(default_factory=list)

    def add(self, batch: Any, micro: int, epoch_sums: list[torch.Tensor]) -> None:
        if not self.batches:
            self.first, self.sums = micro, [t.clone() for t in epoch_sums]
        self.batches.append(batch)

    def close(self) -> None:
        self.batches = []


def discard_step(state: TrainState, window: StepWindow, device: torch.device) -> None:
    """Undo what the failed step did: its gradients, its tallies, its memory."""
    state.optimizer.zero_grad(set_to_none=True)
    for now, before in zip(state.epoch_sums, window.sums, strict=True):
        now.copy_(before)
    release(device)


def _split_further(p: Progress, window: StepWindow, failure: str, dist: DistContext) -> None:
    """Double the split, or say in one line why recovery ends here."""
    if dist.active:  # a rank that replays alone would leave the others waiting in their
        # collective: the job fails, naming the rank
        raise LeantrainError(
            f"out of memory at step {p.step + 1} on rank {dist.rank} ({failure}); recovery "
            "splits batches in a single process only: lower data.batch_size or turn on "
            "plan.activation_checkpointing")
    parts = p.micro_split * 2
    if parts > min(batch_size(b) for b in window.batches):
        raise LeantrainError(
            f"out of memory at step {p.step + 1} even with micro-batches of one sample "
            f"({failure}); lower data.batch_size, or turn on plan.activation_checkpointing")
    p.micro_split = parts
    log.warning("out of memory at step %d: each batch of %d now runs as %d micro-batches, "
                "their gradients accumulated (the global batch is unchanged); the checkpoint "
                "keeps this split", p.step + 1, batch_size(window.batches[0]), parts)


def replay_split(window: StepWindow, p: Progress, failure: str, dist: DistContext,
                 ends_epoch: bool, before_replay: Callable[[], None],
                 micro_step: Callable[[Any, int, bool], tuple[bool, Any]]) -> bool:
    """After the step of `window` failed with `failure`: split further, undo the step
    (`before_replay`) and run its batches again (`micro_step(batch, micro, last)`; the window's
    last batch `ends_epoch` or not), until it fits. Returns whether the replay ended at an
    optimizer step."""
    def replay() -> bool:
        stepped, final = False, window.first + len(window.batches) - 1
        for micro, batch in enumerate(window.batches, start=window.first):
            stepped, _ = micro_step(batch, micro, ends_epoch and micro == final)
        return stepped

    while True:
        _split_further(p, window, failure, dist)
        before_replay()
        stepped, failure = attempt(replay)
        if failure is None:
            return stepped
