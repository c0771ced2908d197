"""Inference latency: median wall time of a forward pass at a fixed batch size, and the paired
speed-up of one model over another."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import clock
from .rounds import interval

Sample = torch.Tensor | dict  # one sample: a tensor, or a dict of tensors (a model's kwargs)
Call = Callable[[nn.Module], Any]  # runs a model on one fixed batch (run.measuring.ModelCall)


def batch_of(sample: Sample, batch_size: int, channels_last: bool = False) -> Sample:
    """`sample` repeated `batch_size` times along a new first dimension (each tensor of a
    dict alike); 4-D image batches in the requested memory format."""
    if isinstance(sample, dict):
        return {k: batch_of(v, batch_size) for k, v in sample.items()}
    batch = sample.unsqueeze(0).expand(batch_size, *sample.shape).contiguous()
    if batch.dim() == 4 and channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def repeated(sample: Sample, batch_size: int, channels_last: bool = False) -> Call:
    """A call of a model on `sample` repeated `batch_size` times: `model(x)`, or
    `model(**inputs)` for a dict (for a model called on its inputs alone; a run's model is
    measured on `run.measuring.measuring_call`, its batches as training unpacks them)."""
    batch = batch_of(sample, batch_size, channels_last)
    return lambda model: model(**batch) if isinstance(batch, dict) else model(batch)


def latency_seconds(model: nn.Module, call: Call, repeats: int = 30, warmup: int = 5,
                    channels_last: bool = False) -> float:
    """Median over `repeats` timed forward passes `call(model)` on CPU, after `warmup`
    untimed ones.

    `channels_last` puts the model's convs in NHWC (the memory format conv models run
    fastest in on CPU; the call's batch must be built alike); otherwise NCHW, so comparisons
    never mix formats.
    """
    _prepare(model, channels_last)
    with torch.inference_mode():
        return _median_forward(model, call, repeats, warmup)


def paired_speedup(model: nn.Module, reference: nn.Module, call: Call,
                   rounds: int = 5, repeats: int = 10, warmup: int = 3,
                   channels_last: bool = False) -> dict:
    """How much faster `model` runs than `reference` on the same `call` (their forward
    times' ratio, > 1: faster), from `rounds` interleaved rounds, each the median of
    `repeats` forwards of both in alternating order, so machine noise hits both alike: the
    median ratio, its 95% interval (None below `rounds.MIN_ROUNDS`) and the rounds' ratios.
    Two separate latency figures taken minutes apart once made int8 look 259x faster."""
    for net in (model, reference):
        _prepare(net, channels_last)
    ratios, times = [], {id(model): [], id(reference): []}
    with torch.inference_mode():
        for net in (model, reference):
            _median_forward(net, call, 0, warmup)
        for r in range(rounds):
            for net in (model, reference) if r % 2 == 0 else (reference, model):
                times[id(net)].append(_median_forward(net, call, repeats, 0))
            ratios.append(times[id(reference)][-1] / max(times[id(model)][-1], 1e-12))
    found = interval(ratios)
    return {"ratio": statistics.median(ratios), "interval": list(found) if found else None,
            "rounds": len(ratios), "ratios": ratios,
            "model_ms": 1e3 * statistics.median(times[id(model)]),
            "reference_ms": 1e3 * statistics.median(times[id(reference)])}


def _prepare(model: nn.Module, channels_last: bool) -> None:
    """Eval mode, on the CPU, conv weights in the memory format asked for."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()  # (not reassigned: an exported graph's eval returns None)
    # the model is converted outside inference mode: weights converted inside it would become
    # inference tensors, which a later fine-tuning of the same model could not train
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.cpu()  # (a no-op .cpu() would still re-wrap tensor subclasses, e.g. torchao's)
    for module in model.modules():  # only conv weights have a layout (and converting
        if isinstance(module, nn.Conv2d):  # other layers would re-wrap quantized tensors)
            module.to(memory_format=fmt)


def _median_forward(model: nn.Module, call: Call, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        call(model)
    times = []
    for _ in range(repeats):
        start = clock.now()
        call(model)
        times.append(clock.now() - start)
    return statistics.median(times) if times else 0.0
