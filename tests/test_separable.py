"""Depthwise-separable conversion: exact layer semantics, multiply-add arithmetic, training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.cli import main
from leantrain.compress.separable import DepthwiseSeparableConv2d, to_separable
from leantrain.measure.flops import count_flops
from leantrain.recipes.models import SmallCNN


def test_separable_layer_equals_depthwise_then_pointwise_by_hand():
    layer = DepthwiseSeparableConv2d(6, 10, 3, stride=2, padding=2, dilation=2, bias=True)
    x = torch.randn(2, 6, 15, 15)
    dw, pw = layer.depthwise, layer.pointwise
    reference = F.conv2d(x, dw.weight, None, stride=2, padding=2, dilation=2, groups=6)
    reference = F.conv2d(reference, pw.weight, pw.bias)
    assert torch.allclose(layer(x), reference, atol=1e-6)
    assert dw.bias is None and pw.bias is not None


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, padding=1),
                                    dict(padding=2, dilation=2), dict(padding="same"),
                                    dict(kernel_size=(3, 5), padding=(1, 2))])
def test_converted_conv_keeps_output_shape_and_bias(kwargs):
    kwargs = {"kernel_size": 3, **kwargs}
    conv = nn.Conv2d(16, 24, bias=False, **kwargs)
    model, changes = to_separable(nn.Sequential(conv))
    x = torch.randn(2, 16, 17, 17)
    assert model(x).shape == conv(x).shape
    assert model[0].pointwise.bias is None and len(changes) == 1


def test_a_128_channel_3x3_conv_loses_over_8x_multiply_adds_as_the_formula_says():
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False)
    x = torch.randn(1, 128, 16, 16)
    with torch.no_grad():
        before = count_flops(lambda: conv(x))
        model, [change] = to_separable(nn.Sequential(conv))
        after = count_flops(lambda: model(x))
    analytic = 1 / 128 + 1 / 9
    assert before / after >= 8
    assert after / before == pytest.approx(analytic, rel=0.01)
    assert change.mac_reduction == pytest.approx(1 / analytic)
    assert change.params_before == 128 * 128 * 9
    assert change.params_after == 128 * 9 + 128 * 128


def test_to_separable_skips_thin_inputs_grouped_and_pointwise_convs():
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 3,
                                                                               groups=32),
                          nn.Conv2d(32, 64, 3))
    model, changes = to_separable(model, min_channels=16)
    assert [c.name for c in changes] == ["3"]
    assert isinstance(model[3], DepthwiseSeparableConv2d)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Conv2d


def test_digits_cnn_conversion_report():
    model, changes = to_separable(SmallCNN(1, 10))
    assert [(c.in_channels, c.out_channels) for c in changes] == [(32, 64), (64, 128)]
    assert all(c.mac_reduction > 7 for c in changes)


@pytest.mark.slow
def test_the_digits_separable_recipe_trains_to_95_percent(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "digits-separable", "--out", str(out),
                 "--no-progress"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.95
