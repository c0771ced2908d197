"""Inference latency: median wall time of a forward pass at a fixed batch size."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def latency_seconds(model: nn.Module, sample: torch.Tensor, batch_size: int,
                    repeats: int = 30, warmup: int = 5, channels_last: bool = False) -> float:
    """Median over `repeats` timed forward passes on CPU, after `warmup` untimed ones.

    `channels_last` puts the model and the batch in NHWC (the memory format conv models run
    fastest in on CPU); otherwise both are NCHW, so comparisons never mix formats.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval()
    # the model is converted outside inference mode: weights converted inside it would become
    # inference tensors, which a later fine-tuning of the same model could not train
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.cpu()  # (a no-op .cpu() would still re-wrap tensor subclasses, e.g. torchao's)
    for module in model.modules():  # only conv weights have a layout (and converting
        if isinstance(module, nn.Conv2d):  # other layers would re-wrap quantized tensors)
            module.to(memory_format=fmt)
    batch = sample.unsqueeze(0).expand(batch_size, *sample.shape).contiguous()
    if batch.dim() == 4:
        batch = batch.contiguous(memory_format=fmt)
    with torch.inference_mode():
        return _median_forward(model, batch, repeats, warmup)


def _median_forward(model: nn.Module, batch: torch.Tensor, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
