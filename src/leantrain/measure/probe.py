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
