"""What this machine has: devices, the GPU to use, and precision support.

Everything above this layer asks here instead of probing torch itself, so a decision such as
"bf16 is not supported here" is made, and explained, in one place.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil
import torch

from .errors import one_line


def cache_folder() -> Path:
    """Where leantrain keeps what it measured or built once (plans, tokenized corpora):
    $LEANTRAIN_CACHE, else the XDG cache folder."""
    if os.environ.get("LEANTRAIN_CACHE"):
        return Path(os.environ["LEANTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "leantrain"


def cuda_free_memory() -> list[int]:
    """Free bytes on each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


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


FP8_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: tensor cores with fp8 matmuls


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether fp8 training (torchao float8) can run fast on `device`, and why (not)."""
    if device.type != "cuda":
        return False, (f"fp8 training needs a CUDA GPU of compute capability "
                       f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper, "
                       f"Blackwell); this device is {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return False, (f"this GPU is compute capability {capability[0]}.{capability[1]}; fp8 "
                       f"matmuls need {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer")
    return True, f"GPU of compute capability {capability[0]}.{capability[1]} runs fp8 matmuls"


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


# ---------------------------------------------------------------- CPU facts

_CPUINFO = "/proc/cpuinfo"
_MAX_FREQ = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"
SIMD_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni",
              "amx_bf16", "amx_int8")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open(_CPUINFO) as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not there."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_simd() -> list[str]:
    """The SIMD features that matter for torch's CPU kernels, as this CPU reports them."""
    flags = cpu_flags()
    return [f for f in SIMD_FLAGS if f in flags]


def cpu_clock_ghz() -> tuple[float | None, str]:
    """(GHz, where it came from): the rated maximum if the kernel exposes it, else the current."""
    try:
        with open(_MAX_FREQ) as f:
            return int(f.read()) / 1e6, "cpufreq maximum"
    except (OSError, ValueError):
        pass
    mhz = _cpuinfo_field("cpu MHz")
    return (float(mhz) / 1000, "current clock from /proc/cpuinfo") if mhz else (None, "unknown")


def compute_cores() -> int:
    """Cores torch computes on: its thread count, but hyper-threads share one core's FMA units."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), physical))


# ---------------------------------------------------------------- what `doctor` reports


def nvml_handle(index: int):
    """(pynvml, NVML's handle) for torch's CUDA device `index`; raises without NVML.

    CUDA_VISIBLE_DEVICES renumbers devices for torch but not for NVML: matched by UUID.
    """
    import pynvml

    pynvml.nvmlInit()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_facts() -> list[dict]:
    """Each visible GPU: name, memory, compute capability, and NVML's current utilization."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        fact = {"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "free_gib": round(torch.cuda.mem_get_info(i)[0] / 2**30, 1),
                "utilization_percent": None}
        try:
            nvml, handle = nvml_handle(i)
            fact["utilization_percent"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # no driver library: utilization stays unknown, the rest is torch's
            pass
        gpus.append(fact)
    return gpus


def distributed_backends() -> dict[str, bool]:
    import torch.distributed as dist

    if not dist.is_available():
        return {"torch.distributed": False}
    return {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
            "mpi": dist.is_mpi_available()}


def compile_works() -> tuple[bool, str]:
    """Compile and run a tiny function for real: a C++ compiler on PATH is not proof enough."""
    ok, why = compiler_available()
    if not ok:
        return False, why
    import time

    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        x = torch.randn(16)
        if not torch.allclose(fn(x), torch.sin(x) * 2 + 1):
            return False, "compiled code gave a different result"
    except Exception as exc:  # any backend failure is the answer, not a crash
        return False, one_line(exc)[:200]
    return True, f"compiled and ran a test function in {time.perf_counter() - start:.1f} s"


def machine_facts(check_compile: bool = True) -> dict:
    """Everything `leantrain doctor` says about this machine, as plain data."""
    cpu = torch.device("cpu")
    cuda = torch.device("cuda", 0) if torch.cuda.is_available() else None
    ghz, clock_source = cpu_clock_ghz()
    facts = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": gpu_facts(),
        "gpu_note": "" if cuda else "no GPU: torch sees no CUDA device on this machine",
        "bf16": {"cpu": bf16_supported(cpu)[1]} | ({"cuda": bf16_supported(cuda)[1]} if cuda
                                                    else {}),
        "tf32": tf32_capable(cuda) if cuda else False,
        "mps": mps_available(),
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(),
                "physical_cores": psutil.cpu_count(logical=False),
                "torch_threads": torch.get_num_threads(), "simd": cpu_simd(),
                "clock_ghz": ghz, "clock_source": clock_source},
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "distributed": distributed_backends(),
    }
    facts["compile"] = compile_works() if check_compile else (None, "not checked")
    return facts
