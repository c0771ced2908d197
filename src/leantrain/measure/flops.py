"""FLOPs of a training step and model FLOPs utilization (MFU).

FLOPs are counted once, on one real batch, with `torch.utils.flop_counter.FlopCounterMode`,
which counts the matmuls and convolutions actually dispatched (forward and backward), so a
layer whose input needs no gradient is not charged for one. MFU is the achieved rate of those
FLOPs over the device's peak for the precision in use. GPU peaks are the vendors' dense
(no-sparsity) tensor-core figures; a CPU peak is estimated from cores x clock x SIMD width
and always labelled an estimate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..env import compute_cores, cpu_clock_ghz, cpu_flags

# Dense peak TFLOP/s per GPU: (bf16/fp16 tensor cores, tf32, plain fp32). Matched in order
# against torch.cuda.get_device_name, so more specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, str, tuple[float, float, float]]] = [
    (r"B200", "B200", (2250.0, 1100.0, 80.0)),
    (r"H200", "H200", (989.0, 494.0, 67.0)),
    (r"H100.*PCIe", "H100 PCIe", (756.0, 378.0, 51.0)),
    (r"H100.*NVL", "H100 NVL", (835.0, 418.0, 60.0)),
    (r"H100", "H100 SXM", (989.0, 494.0, 67.0)),
    (r"A100", "A100", (312.0, 156.0, 19.5)),
    (r"L40S", "L40S", (362.0, 183.0, 91.6)),
    (r"\bL4\b", "L4", (121.0, 60.0, 30.3)),
    (r"A10G", "A10G", (70.0, 35.0, 31.2)),
    (r"\bA10\b", "A10", (125.0, 62.5, 31.2)),
    (r"RTX 4090", "RTX 4090", (165.0, 82.6, 82.6)),
    (r"V100", "V100 (fp16)", (125.0, 15.7, 15.7)),
    (r"\bT4\b", "T4 (fp16)", (65.0, 8.1, 8.1)),
]


@dataclass(frozen=True)
class Peak:
    flops_per_second: float
    label: str  # what the figure is, e.g. "H100 SXM bf16 dense" or the CPU formula
    estimate: bool


def _count_cpu_attention() -> None:
    """Teach the counter the CPU flash-attention kernels, which it has no formula for here.

    Without this, `scaled_dot_product_attention` on CPU counts as 0 FLOPs and a transformer's
    MFU comes out low by the attention share. The CUDA kernels' formulas apply unchanged:
    the CPU op takes the same query/key/value shapes.
    """
    def forward(query, key, value, *args, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    pairs = [("_scaled_dot_product_flash_attention_for_cpu", forward),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)]
    for name, formula in pairs:
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


_count_cpu_attention()


def grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """A grouped matrix multiply (MoE experts: each row of `a`, or each group of `a`, times
    one expert's matrix): 2 x rows x the contraction x the output width, per layout."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # rows grouped by offs, one (K, N) each
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:  # batched: (G, M, K) x (G, K, N)
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # the contraction split by offs
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]  # (G, M, K) x (K, N) split by columns


def grouped_mm_backward_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """The gradients of both operands: twice the forward's multiply-adds."""
    return 2 * grouped_mm_flops(a_shape, b_shape)


def _count_grouped_mm() -> None:
    """Teach the counter the grouped matrix multiplies that run MoE experts, which it has no
    formula for: transformers 5 runs experts through `torch._grouped_mm` (or its own fallback
    op where that has no kernel), and their FLOPs were missing, a Mixtral's MFU 3x low.

    Called at every count: transformers registers its fallback op when it is imported,
    which may be after leantrain's import."""
    pairs = [(getattr(torch.ops.aten, "_grouped_mm", None), grouped_mm_flops)]
    if hasattr(torch.ops, "transformers"):
        ops = torch.ops.transformers
        pairs += [(getattr(ops, "grouped_mm_fallback", None), grouped_mm_flops),
                  (getattr(ops, "grouped_mm_fallback_backward", None),
                   grouped_mm_backward_flops)]
    for op, formula in pairs:
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that `fn()` dispatches (matmuls, convolutions, attention and grouped expert
    matmuls, forward and backward)."""
    _count_grouped_mm()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def gpu_peak(name: str, precision: str, tf32: bool) -> Peak | None:
    """The table's peak for a GPU name, or None when the GPU is not in the table."""
    for pattern, label, (half, tf32_peak, fp32) in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            if precision in ("bf16", "fp16"):
                return Peak(half * 1e12, f"{label} {precision} dense", False)
            if precision.startswith("fp8"):  # fp8 and bf16 layers mix: against bf16's peak,
                # so the MFU of an fp8 run compares with a bf16 run's (fp8's peak is 2x)
                return Peak(half * 1e12, f"{label} bf16 dense (an fp8 run, against the bf16 "
                                         "peak)", False)
            if tf32:
                return Peak(tf32_peak * 1e12, f"{label} tf32 dense", False)
            return Peak(fp32 * 1e12, f"{label} fp32", False)
    return None


def cpu_flops_per_cycle(flags: set[str], precision: str) -> tuple[int, str]:
    """Per-core FLOPs per cycle, assuming two FMA units of the widest SIMD the CPU reports."""
    lanes, isa = (16, "AVX-512") if "avx512f" in flags else (8, "AVX2") if "avx2" in flags \
        else (4, "SSE")
    fp32 = 2 * 2 * lanes  # 2 FMA units x (multiply + add) x fp32 lanes
    if precision == "bf16" and "amx_bf16" in flags:
        return 2048, "AMX bf16 (1024 FMA/cycle)"
    if precision == "bf16" and "avx512_bf16" in flags:
        return 2 * fp32, "AVX-512 BF16 dot products (2x fp32)"
    return fp32, f"{isa} fp32, 2 FMA units"


def cpu_peak(precision: str) -> Peak | None:
    ghz, clock_source = cpu_clock_ghz()
    if ghz is None:
        return None
    cores = compute_cores()
    per_cycle, how = cpu_flops_per_cycle(cpu_flags(), precision)
    label = (f"estimate: {cores} cores x {ghz:.2f} GHz ({clock_source}) x {per_cycle} "
             f"FLOP/cycle ({how}); an upper bound, CPUs that split wide vectors run at half")
    return Peak(cores * ghz * 1e9 * per_cycle, label, True)


def device_peak(device: torch.device, precision: str, tf32: bool = False
                ) -> tuple[Peak | None, str]:
    """(peak, why none) for the device and the precision the run computes in."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision, tf32)
        return peak, "" if peak else f"{name} is not in leantrain's peak table"
    if device.type == "cpu":
        peak = cpu_peak(precision)
        return peak, "" if peak else "the CPU clock is not readable here"
    return None, f"no peak figures for {device.type} devices"


def mfu(flops_per_sample: float, samples_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the peak."""
    return flops_per_sample * samples_per_second / peak_flops
