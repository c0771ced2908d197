"""Weight initialisation schemes for conv and linear layers.

A good scale at the start avoids vanishing or exploding activations and can shorten training.
kaiming (He) suits ReLU nets; xavier (Glorot) suits tanh/sigmoid or attention projections;
orthogonal keeps signal norms in deep or recurrent stacks; dirac makes each conv start as an
identity map (residual-like behaviour in plain conv stacks; linear layers get xavier, as dirac
has no meaning for them). "default" keeps the model's own initialisation. Changes the numbers
by design, so it is not a lossless technique.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LeantrainError

NAME = "init"
LOSSLESS = False
VARIANTS = ()
BENCH_NOTE = "changes the starting weights (what is learned), not the step speed"
SCHEMES = ("default", "kaiming", "xavier", "orthogonal", "dirac")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _init_weight(weight: torch.Tensor, scheme: str, is_conv: bool) -> None:
    if scheme == "kaiming":
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
    elif scheme == "xavier" or (scheme == "dirac" and not is_conv):
        nn.init.xavier_uniform_(weight)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight)
    elif scheme == "dirac":
        nn.init.dirac_(weight)


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every conv/linear weight with `scheme`; biases start at zero."""
    if scheme not in SCHEMES:
        raise LeantrainError(f"init scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "default":
        return model
    for module in model.modules():
        if isinstance(module, _LAYERS):
            is_conv = not isinstance(module, nn.Linear)
            if is_conv and module.groups > 1 and scheme == "dirac":
                nn.init.dirac_(module.weight, groups=module.groups)
            else:
                _init_weight(module.weight, scheme, is_conv)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
