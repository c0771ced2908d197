"""int8 quantization of Linear layers with torchao: size, accuracy of outputs, errors."""

import copy
import io

import pytest
import torch
from torch import nn

from leantrain.compress.quantize import METHODS, output_error, quantize_linear, state_bytes
from leantrain.errors import LeantrainError
from leantrain.measure.latency import latency_seconds, repeated


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10)).eval()


@pytest.mark.parametrize("method, tolerance", [("int8-dynamic", 0.05),
                                               ("int8-weight-only", 0.02)])
def test_int8_linear_weights_are_4x_smaller_and_outputs_stay_close(method, tolerance):
    base = _mlp()
    quantized = quantize_linear(copy.deepcopy(base), method)
    assert state_bytes(base) / state_bytes(quantized) >= 3.5
    x = torch.randn(32, 256)
    error = output_error(base, quantized, x)
    assert error["max_rel_error"] < tolerance
    assert latency_seconds(quantized, repeated(x[0], 8), repeats=3, warmup=1) > 0
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # a quantized checkpoint is still weights-only


def test_a_conv_only_model_gets_a_clear_error_naming_the_pt2e_path():
    with pytest.raises(LeantrainError, match="pt2e flow with the x86 Inductor quantizer"):
        quantize_linear(nn.Sequential(nn.Conv2d(1, 4, 3)), "int8-dynamic")


def test_an_unknown_method_lists_the_allowed_ones():
    with pytest.raises(LeantrainError, match=", ".join(METHODS)):
        quantize_linear(_mlp(), "int4")


@pytest.mark.slow
def test_compiled_int8_dynamic_matches_eager():
    quantized = quantize_linear(_mlp(), "int8-dynamic")
    x = torch.randn(16, 256)
    with torch.inference_mode():
        eager = quantized(x)
        compiled = torch.compile(quantized)(x)
    assert torch.allclose(eager, compiled, rtol=0.02, atol=0.02)


# ------------------------------------------------------------------ int8-static (pt2e) for convs


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


def test_int8_static_quantizes_a_conv_model_close_to_fp32():
    from leantrain.compress.quantize import quantize_pt2e
    model = _conv_net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 1, 12, 12, generator=g) for _ in range(4)]
    quantized = quantize_pt2e(model, batches[0], batches)
    names = {str(n.target) for n in quantized.graph.nodes}
    assert any("quantize_per_tensor" in name for name in names)  # int8 q/dq in the graph
    weights = [v for v in quantized.state_dict().values() if v.dim() > 1]
    assert weights and all(v.dtype == torch.int8 for v in weights)  # no float copy left behind
    x = torch.randn(8, 1, 12, 12, generator=g)
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_int8_static_needs_calibration_batches():
    from leantrain.compress.quantize import quantize_pt2e
    with pytest.raises(LeantrainError, match="needs calibration batches"):
        quantize_pt2e(_conv_net(), torch.randn(2, 1, 12, 12), [])
