"""int8 quantization of Linear layers with torchao (`quantize_`; torch.ao.quantization is
deprecated).

Two paths, both without calibration data (activations are quantized per batch at run time,
or not at all):

- int8-dynamic: int8 weights and dynamically quantized int8 activations. `torch.compile`
  fuses the quantize/matmul/dequantize; eager, the per-call quantization overhead can make
  small batches slower than fp32.
- int8-weight-only: int8 weights, fp32 activations: smaller on disk and in memory.

Whether either is faster depends on the model, the batch and the CPU: measure both, eager
and compiled (benchmarks/quantize_mlp.py does, and its results are in the README).

Weights shrink about 4x either way. Conv layers are left alone: for conv models the path is
the pt2e flow with the x86 Inductor quantizer, which leantrain does not implement; it says
so instead of returning an unchanged model.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from ..errors import LeantrainError

METHODS = ("int8-dynamic", "int8-weight-only")


def _config(method: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int8-weight-only":
        return Int8WeightOnlyConfig()
    raise LeantrainError(f"quantization {method!r}: allowed {', '.join(METHODS)}")


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_linear(model: nn.Module, method: str = "int8-dynamic") -> nn.Module:
    """Quantize every nn.Linear of `model` in place (on CPU) and return it."""
    config = _config(method)
    if not linear_layers(model):
        convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
        raise LeantrainError(
            "nothing to quantize: the model has no nn.Linear layer"
            + ("; conv layers need the pt2e flow with the x86 Inductor quantizer, which "
               "leantrain does not implement yet" if convs else ""))
    from torchao.quantization import quantize_

    quantize_(model.eval().cpu(), config)
    return model


def state_bytes(model: nn.Module) -> int:
    """Size of the model's state_dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def output_error(reference: nn.Module, quantized: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max absolute difference of the outputs, and that relative to the largest fp32 output."""
    ref, out = reference(x).float(), quantized(x).float()
    worst = (out - ref).abs().max().item()
    return {"max_abs_error": worst, "max_rel_error": worst / ref.abs().max().item()}
