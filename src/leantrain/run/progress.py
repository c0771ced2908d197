"""How far a run has come: what a resume must restore besides weights and optimizer state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Progress:
    """Everything besides weights and optimizer state that a resume must restore."""

    epoch: int = 0
    batch: int = 0  # next micro-batch of `epoch` to run
    step: int = 0  # optimizer steps taken
    samples: int = 0
    step_seconds: float = 0.0  # time inside training steps (compile warm-up excluded)
    train_seconds: float = 0.0  # wall time of the loop: steps, evaluation, checkpoints
    compile_seconds: float = 0.0
    time_to_target: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    val_mae: float | None = None
    val_task_loss: float | None = None  # the task's loss alone, when the model's holds more
    val_aux_loss: float | None = None  # ... and the rest: the model's auxiliary terms
    stop_reason: str | None = None  # a target met, or train.max_steps reached
    finished: bool = False
    # each loader batch runs as this many micro-batches, their gradients accumulated: raised
    # by out-of-memory recovery (run.recovery), and kept by checkpoints so a resume keeps it
    micro_split: int = 1
    # metrics.jsonl's complete lines when the checkpoint was saved: a resume drops exactly
    # what was logged after it (None: a checkpoint from before this was kept; steps decide)
    logged: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
