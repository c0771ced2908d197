"""CPU and GPU utilization, sampled in a background thread while a run trains.

CPU: utilization per core and the process's own CPU use and RSS (psutil). GPU: utilization,
memory used and power draw (NVML, through nvidia-ml-py). A machine without an NVIDIA driver
gets the CPU part and a note saying why there is no GPU part. Sampling reads counters only;
it never touches torch, so it cannot slow or synchronize the training thread beyond its own
few microseconds of CPU per sample.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from ..env import nvml_handle

log = logging.getLogger(__name__)

Sample = dict[str, Any]


class _Gpu:
    """One GPU through NVML; `error` says why it is unavailable."""

    def __init__(self, device: torch.device | None):
        self.handle, self.error = None, ""
        if not torch.cuda.is_available():
            self.error = "no GPU on this machine (torch sees no CUDA device): CPU only"
            return
        if device is None or device.type != "cuda":
            self.error = "the run does not train on a GPU: CPU only"
            return
        try:
            self.nvml, self.handle = nvml_handle(device.index or 0)
        except Exception as exc:  # NVML raises its own error classes, one per cause
            self.error = f"NVML unavailable ({type(exc).__name__}: {exc})"

    def sample(self) -> Sample:
        nvml, h = self.nvml, self.handle
        return {
            "gpu_util_percent": float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).used),
            "gpu_power_watts": nvml.nvmlDeviceGetPowerUsage(h) / 1000,
        }


class ResourceMonitor:
    """Start it, train, stop it (or use it as a context manager); then read `summary()`.

    `sink`, if given, receives every sample as it is taken (the trainer writes them to the
    run's metrics.jsonl and TensorBoard).
    """

    def __init__(self, interval_s: float = 1.0, device: torch.device | None = None,
                 sink: Callable[[Sample], None] | None = None):
        if interval_s <= 0:
            raise ValueError(f"monitor interval must be > 0 seconds, got {interval_s}")
        self.interval_s, self.sink = interval_s, sink
        self.gpu = _Gpu(device)
        self.samples: list[Sample] = []
        self.process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ResourceMonitor:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leantrain-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> ResourceMonitor:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # the first cpu_percent call only sets the reference point for the next one, and
        # psutil keeps that reference per thread: it must be made here, not in start()
        psutil.cpu_percent(percpu=True)
        self.process.cpu_percent()
        start = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                sample = self.sample(time.monotonic() - start)
            except Exception as exc:  # a monitor must never take a training run down
                log.warning("resource monitor stopped: %s: %s", type(exc).__name__, exc)
                return
            self.samples.append(sample)
            if self.sink is not None:
                self.sink(sample)

    def sample(self, elapsed: float) -> Sample:
        per_core = psutil.cpu_percent(percpu=True)
        sample: Sample = {
            "time_s": round(elapsed, 3),
            "cpu_percent": statistics.fmean(per_core),
            "cpu_percent_per_core": per_core,
            "process_cpu_percent": self.process.cpu_percent(),
            "rss_bytes": self.process.memory_info().rss,
        }
        if self.gpu.handle is not None:
            sample.update(self.gpu.sample())
        return sample

    def summary(self) -> dict[str, Any]:
        """Mean and max of each figure over the samples, the per-core means, and the GPU note."""
        out: dict[str, Any] = {"samples": len(self.samples), "interval_s": self.interval_s,
                               "gpu": self.gpu.error or "monitored"}
        if not self.samples:
            return out
        for key, value in self.samples[0].items():
            if key == "time_s" or not isinstance(value, (int, float)):
                continue
            values = [s[key] for s in self.samples]
            out[key] = {"mean": statistics.fmean(values), "max": max(values)}
        cores = zip(*(s["cpu_percent_per_core"] for s in self.samples), strict=True)
        out["cpu_percent_per_core_mean"] = [round(statistics.fmean(c), 1) for c in cores]
        return out
