"""Inference latency: median wall time of a forward pass at a fixed batch size."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def latency_seconds(model: nn.Module, sample: torch.Tensor, batch_size: int,
                    repeats: int = 30, warmup: int = 5) -> float:
    """Median over `repeats` timed forward passes on CPU, after `warmup` untimed ones."""
    model = model.eval().cpu()
    batch = sample.unsqueeze(0).expand(batch_size, *sample.shape).contiguous()
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
