"""Run a model for a measurement and leave it exactly as it was.

Counting FLOPs or timing a loader runs real forward and backward passes; those must not
change what training then does: BatchNorm statistics, gradients, train/eval mode and the
random streams (dropout) are put back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = list(model.parameters())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield model
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            for module, training in modes:
                module.training = training


EVAL_SEED = 0  # every evaluation draws from this seed: compared models see the same noise


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


@contextmanager
def seeded(device: torch.device, seed: int = EVAL_SEED) -> Iterator[None]:
    """The same random draws inside every time, and the caller's random streams as they were
    afterwards. A model that draws noise in `forward` (a diffusion model's noise and levels)
    is then evaluated on the same noise whichever weights it has: trained, pruned, quantized,
    a student or a trial, so comparing two of them measures the models, not the draws."""
    devices = _cuda_devices(device)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def random_states(device: torch.device) -> list[torch.Tensor]:
    """The CPU's random state, and the device's where it is a GPU (to tell whether a call
    drew random numbers)."""
    states = [torch.get_rng_state()]
    return states + [torch.cuda.get_rng_state(i) for i in _cuda_devices(device)]
