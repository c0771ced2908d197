"""What this machine has: devices, the GPU to use, and precision support.

Everything above this layer asks here instead of probing torch itself, so a decision such as
"bf16 is not supported here" is made, and explained, in one place.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass

import torch

from .errors import LeantrainError


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def cuda_free_memory() -> list[int]:
    """Free bytes on each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(requested: str = "auto") -> DeviceChoice:
    """Pick the device to train on.

    "auto" prefers CUDA, then MPS, then CPU. On a multi-GPU host it takes the GPU with the most
    free memory, unless CUDA_VISIBLE_DEVICES is set: then the user chose, and the first visible
    GPU is used. An explicit request that this machine cannot honour is an error, not a fallback.
    """
    if requested == "auto":
        free = cuda_free_memory()
        if free:
            if os.environ.get("CUDA_VISIBLE_DEVICES"):
                return DeviceChoice(torch.device("cuda", 0), "first GPU in CUDA_VISIBLE_DEVICES")
            best = max(range(len(free)), key=free.__getitem__)
            gib = free[best] / 2**30
            why = f"most free memory ({gib:.1f} GiB) of {len(free)} GPUs" if len(free) > 1 \
                else "the only GPU"
            return DeviceChoice(torch.device("cuda", best), why)
        if mps_available():
            return DeviceChoice(torch.device("mps"), "Apple GPU (MPS)")
        return DeviceChoice(torch.device("cpu"), "no GPU found")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise LeantrainError(
            f"plan.device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise LeantrainError(
                f"plan.device {requested!r} asked for, but this machine has {count} CUDA device(s)"
            )
        return DeviceChoice(torch.device("cuda", index), "requested")
    if device.type == "mps" and not mps_available():
        raise LeantrainError("plan.device 'mps' asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LeantrainError(f"plan.device {requested!r}: allowed are auto, cpu, cuda, cuda:N, mps")
    return DeviceChoice(device, "requested")


def bf16_supported(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 math runs natively (fast) on `device`, and why (not)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, "GPU supports bf16"
        return False, "this GPU has no bf16 support (needs compute capability >= 8.0)"
    if device.type == "cpu":
        fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if fast:
            return True, "CPU has native bf16 instructions (AVX-512 BF16 / AMX)"
        return False, "CPU lacks native bf16 instructions; bf16 would be emulated and slower"
    if device.type == "mps":
        return True, "MPS supports bf16"
    return False, f"unknown device type {device.type}"


def tf32_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def compiler_available() -> tuple[bool, str]:
    """torch.compile's default backend (Inductor) needs a C++ compiler on CPU, Triton on GPU."""
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if platform.system() == "Windows":
        return False, "torch.compile (Inductor) is not supported on Windows by this torch"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang", "c++")):
        return False, "no C++ compiler on PATH; Inductor needs one"
    return True, "Inductor backend available"
