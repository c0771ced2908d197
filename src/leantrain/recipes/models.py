"""Small reference models: the digits CNN, and defaults for user data given without a model."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LeantrainError


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Sequential):
    """Three 3×3 conv blocks (32-64-128 channels by default), global pooling, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__(
            *conv_block(in_channels, width), nn.MaxPool2d(2),
            *conv_block(width, 2 * width), nn.MaxPool2d(2),
            *conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, num_classes),
        )


def digits_student() -> nn.Module:
    """A student for digits-cnn: the same shape at a quarter of the width (15x fewer params)."""
    return SmallCNN(1, 10, width=8)


def text_gpt_student() -> nn.Module:
    """A student for text-gpt's default teacher (4 blocks, width 192): 2 blocks at width 96,
    about 8x fewer parameters; context 128 covers any shorter data.context."""
    from .gpt import GPT

    return GPT(256, 128, depth=2, width=96, heads=4, tie_weights=True)


class MLP(nn.Sequential):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 2):
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        super().__init__(*layers, nn.Linear(width, num_classes))


def default_model(sample: torch.Tensor, num_classes: int) -> nn.Module:
    """A SmallCNN for image-shaped samples (C×H×W), an MLP for anything else with features."""
    if sample.dim() == 0:
        raise LeantrainError("samples are scalars; no default model fits, pass --model")
    if sample.dim() == 3:
        return SmallCNN(sample.shape[0], num_classes)
    mlp = MLP(math.prod(sample.shape), num_classes)
    return mlp if sample.dim() == 1 else nn.Sequential(nn.Flatten(), mlp)
