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

# memory left free when judging a fit: the CUDA context and allocator slack on a GPU, the
# interpreter and libraries on a CPU (the batch-size finder and the memory estimate)
MARGIN = 0.10
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_MEMINFO = Path("/proc/meminfo")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _proc_kib(path: Path, key: str) -> int | None:
    """A "Key:   123 kB" field of a /proc file, in bytes; None where there is no /proc."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_peak_since_reset() -> int | None:
    return _proc_kib(_STATUS, "VmHWM")


def current_rss_bytes() -> int | None:
    return _proc_kib(_STATUS, "VmRSS")


def cuda_memory_bytes(device: torch.device) -> int:
    """A GPU's whole memory (what its allocated tensors may reach)."""
    return torch.cuda.mem_get_info(device)[1]


def available_ram_bytes() -> int | None:
    """What the machine can still give without swapping (Linux's MemAvailable)."""
    return _proc_kib(_MEMINFO, "MemAvailable")


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
