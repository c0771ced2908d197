"""Depthwise-separable convolutions (MobileNets): a k×k conv as depthwise k×k + pointwise 1×1.

A standard k×k conv with N input and M output channels costs k²·N·M multiply-adds per output
position; the separable pair costs k²·N (depthwise: one k×k filter per input channel) plus
N·M (pointwise), a ratio of 1/M + 1/k², about 8-9x fewer for 3×3 kernels. The pair is a
different (smaller) function class, not a re-parametrization: converted layers start from new
weights and the model must be trained or fine-tuned. Depthwise convs are memory-bound, so the
wall-clock gain is smaller than the multiply-add gain and has to be measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


class DepthwiseSeparableConv2d(nn.Sequential):
    """k×k depthwise (groups = in_channels) then 1×1 pointwise, optionally norm/activation
    between them. Stride, padding, dilation and padding mode act on the depthwise conv, as
    they would on the conv it replaces; the bias (if any) is on the pointwise conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros",
                 norm: bool = False, activation: bool = False):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=in_channels, bias=False,
                      padding_mode=padding_mode)]
        if norm:
            layers.append(nn.BatchNorm2d(in_channels))
        if activation:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(in_channels, out_channels, 1, bias=bias))
        super().__init__(*layers)

    @property
    def depthwise(self) -> nn.Conv2d:
        return self[0]

    @property
    def pointwise(self) -> nn.Conv2d:
        return self[-1]


@dataclass(frozen=True)
class LayerChange:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    params_before: int
    params_after: int
    macs_per_position_before: int  # multiply-adds per output position
    macs_per_position_after: int

    @property
    def mac_reduction(self) -> float:
        return self.macs_per_position_before / self.macs_per_position_after

    def to_dict(self) -> dict:
        return asdict(self) | {"mac_reduction": self.mac_reduction}


def eligible(conv: nn.Module, min_channels: int) -> bool:
    """A plain (groups=1) 2-D conv with a kernel larger than 1×1 and enough input channels."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and max(conv.kernel_size) > 1
            and conv.in_channels >= min_channels)


def _separable_like(conv: nn.Conv2d, norm: bool, activation: bool) -> DepthwiseSeparableConv2d:
    layer = DepthwiseSeparableConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.bias is not None, conv.padding_mode, norm, activation)
    return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_separable(model: nn.Module, min_channels: int = 16, norm: bool = False,
                 activation: bool = False) -> tuple[nn.Module, list[LayerChange]]:
    """Replace every eligible Conv2d in `model` (in place) and report each replacement.

    The first layer of an image model usually has 1-3 input channels: a depthwise conv there
    saves nothing, hence `min_channels`.
    """
    changes = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not eligible(child, min_channels):
                continue
            new = _separable_like(child, norm, activation)
            setattr(module, child_name, new)
            kh, kw = child.kernel_size
            n, m = child.in_channels, child.out_channels
            changes.append(LayerChange(
                f"{name}.{child_name}" if name else child_name, n, m, (kh, kw),
                _params(child), _params(new), kh * kw * n * m, kh * kw * n + n * m))
    return model, changes
