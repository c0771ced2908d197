"""Peak memory of a run: CUDA's allocator peak on GPU, the process's peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory(), "MPS driver allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes; this is the whole process's peak, imports included
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
