"""How a model is called when it is measured rather than trained: FLOPs, latency, pruning's
trace and every report call it on a real collated batch, unpacked by the step contract, so
any model that trains can be measured.

One sample with its labels stripped, repeated along a new first dimension, was what the
measurements ran on before: an encoder-decoder (T5, Whisper) then had no decoder inputs and
crashed after the work was done, a collate that adds keys (CLIP's `return_loss`, padding)
was skipped, and an output head that only the loss reads was left out of pruning's graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.batching import samples_from_start
from ..data.loaders import CheckedCollate
from .step import Step, step_for


@dataclass(frozen=True)
class _CpuPlan:
    """What `step_for` reads of a plan: measuring runs on the CPU in fp32."""

    channels_last: bool = False
    device: torch.device = torch.device("cpu")

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


@dataclass(frozen=True)
class ModelCall:
    """A model called on one batch exactly as training and evaluation call it: `call(model)`.
    The same call measures every model compared (trained, pruned, quantized, students)."""

    args: tuple
    kwargs: dict[str, Any]
    size: int  # samples in the batch

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def example(self) -> Any:
        """The inputs alone, as tracers take them: the keyword dict, else the one tensor (or
        the tuple of them)."""
        if self.kwargs:
            return self.kwargs
        return self.args[0] if len(self.args) == 1 else self.args

    def describe(self) -> str:
        shown = [f"{k} {_shape(v)}" for k, v in self.kwargs.items()]
        shown += [str(_shape(a)) for a in self.args]
        return ", ".join(shown)


def measuring_step(model: nn.Module, channels_last: bool = False) -> Step:
    """The model's step contract on the CPU in fp32 (labels passed when `forward` takes them;
    an encoder-decoder always gets them)."""
    return step_for(model, _CpuPlan(channels_last))


def measuring_call(model: nn.Module, dataset: Dataset, size: int, collate_fn=None,
                   channels_last: bool = False) -> ModelCall:
    """`size` samples of `dataset` (from its start, repeated when it holds fewer; a stream's
    first ones), collated by the run's `collate_fn` and unpacked as the training step unpacks
    them."""
    if size < 1:
        raise ValueError(f"a measuring batch needs at least one sample, got {size}")
    batch = CheckedCollate(collate_fn)(samples_from_start(dataset, size))
    sb = measuring_step(model, channels_last).unpack(batch)
    return ModelCall(sb.args, sb.kwargs, size)


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
