"""Peak memory of a run or trial: CUDA's allocator peak on GPU, the process's peak RSS on CPU.

On Linux the RSS high-water mark can be reset (write "5" to /proc/self/clear_refs), so a CPU
peak is the peak since the last `reset_peak`, not since the process started; where that is not
possible the label says the peak covers the whole process.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_since_reset() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_resettable = False


def reset_peak(device: torch.device) -> None:
    global _resettable
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        _resettable = _reset_rss_peak()


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory(), "MPS driver allocated"
    peak = _rss_peak_since_reset() if _resettable else None
    if peak is not None:
        return peak, "process peak RSS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes; this peak covers the whole process, imports included
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS since start"
