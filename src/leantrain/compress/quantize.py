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

Weights shrink about 4x either way. Conv layers are left alone by these two; conv models take
the third path:

- int8-static (`quantize_pt2e`): the PyTorch 2 export flow with torchao's x86 Inductor
  quantizer. The model is captured with `torch.export`, observers are inserted, the user's
  batches calibrate the activation ranges, and the converted graph runs int8 convolutions and
  matmuls once `torch.compile` lowers it (eager, it only simulates them: that is not how it
  pays).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import LeantrainError, one_line

METHODS = ("int8-dynamic", "int8-weight-only")
STATIC = "int8-static"


def _config(method: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int8-weight-only":
        return Int8WeightOnlyConfig()
    raise LeantrainError(f"quantization {method!r}: allowed {', '.join(METHODS)}")


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# a Linear with fewer inputs stays float: int8 gains it nothing, and torchao's per-row
# scales fail on one input feature (a diffusion model's time embedding, Linear(1, 32))
MIN_FEATURES = 16


def quantize_linear(model: nn.Module, method: str = "int8-dynamic") -> nn.Module:
    """Quantize every nn.Linear of `model` in place (on CPU) and return it.

    Hugging Face `Conv1D` layers (GPT-2) are converted to the equal `nn.Linear` first, so they
    are quantized too. A Linear whose weight is tied to an embedding (an LM head) is left in
    float: quantizing it would untie it, storing the embedding twice (GPT-2 grew from 124,672
    to 141,056 parameters that way); so is one with fewer than MIN_FEATURES inputs."""
    from .attention import conv1d_to_linear

    config = _config(method)
    conv1d_to_linear(model)
    if not linear_layers(model):
        convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
        raise LeantrainError(
            "nothing to quantize: the model has no nn.Linear layer"
            + ("; for conv layers use int8-static (quantize_pt2e: the pt2e flow with the x86 "
               "Inductor quantizer, calibrated on your data)" if convs else ""))
    from torchao.quantization import quantize_

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def quantized(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and id(module.weight) not in tied \
            and module.in_features >= MIN_FEATURES

    if not any(quantized(m, "") for m in model.modules()):
        raise LeantrainError(f"nothing to quantize: every nn.Linear has fewer than "
                             f"{MIN_FEATURES} inputs (or is tied to an embedding)")
    quantize_(model.eval().cpu(), config, filter_fn=quantized)
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


def quantize_pt2e(model: nn.Module, example: torch.Tensor,
                  calibration: Iterable[torch.Tensor]) -> nn.Module:
    """int8-static for conv (and Linear) models: export, annotate with the x86 Inductor
    quantizer, calibrate on `calibration` batches, convert. Run the result under
    `torch.compile` with `torch._inductor.config.freezing = True` (the weights folded into
    constants, which Inductor packs for its int8 kernels: 3.2x compiled fp32 on the digits
    CNN, benchmarks/quantize_cnn.py); on CPU, in NCHW."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    try:
        exported = torch.export.export(  # any batch size, not only the example's
            model.eval().cpu(), (example.cpu(),),
            dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    except Exception as exc:  # a graph break torch.export cannot capture
        raise LeantrainError(f"int8-static needs a model torch.export can capture: "
                             f"{one_line(exc)}") from exc
    prepared = prepare_pt2e(exported, quantizer)
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            prepared(batch.cpu())
            seen += 1
    if seen == 0:
        raise LeantrainError("int8-static needs calibration batches; none were given")
    converted = convert_pt2e(prepared)
    _drop_unused_weights(converted)
    # an exported graph refuses .eval()/.train(); callers (latency, evaluation) use them
    allow_exported_model_train_eval(converted)
    return converted


def _drop_unused_weights(graph: torch.fx.GraphModule) -> None:
    """Delete the float weights convert_pt2e replaced with int8 constants but left on the
    module: kept, they made the state_dict 24% bigger than fp32's instead of 3.7x smaller."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name in [k for k in graph.state_dict() if k not in used]:
        owner, _, attribute = name.rpartition(".")
        delattr(graph.get_submodule(owner) if owner else graph, attribute)


def save_static(model: torch.fx.GraphModule, example: torch.Tensor, path) -> None:
    """The int8-static model as a torch.export program (`torch.export.load(path).module()`
    gives it back): its graph is not an nn.Module a state_dict could be loaded into."""
    from ..checkpoint import atomic_export

    # a copy: the program stores its example, and a view would bring the whole storage along
    example = example.detach().cpu().clone()
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    atomic_export(program, path)
