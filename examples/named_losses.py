"""A custom two-head model that returns its loss as named terms and no `loss`.

Models with several objectives often return each term by name (`loss_cls`, `loss_aux`, ...)
rather than one total. leantrain trains on their sum (the summary's "loss is" line and a
warning say so), never on the logits alone: here a classification term and an auxiliary
regression term on a second head. Dict batches `{"x", "labels"}`, generated (no download).

    leantrain train --model named_losses:model --data named_losses:data \\
        --set optim.name=adamw --set optim.lr=3e-3 --set train.epochs=6
    python named_losses.py

(run from this folder; tests/test_your_model.py trains it through fit, bench and train and
checks that it learns; the docs' snippet test runs the command).
"""

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.data.loaders import TensorDictDataset


class TwoTerms(nn.Module):
    """Class scores from one head, the sum of the inputs from the other."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.classes, self.aux = nn.Linear(32, 3), nn.Linear(32, 1)

    def forward(self, x, labels=None):
        h = self.body(x)
        logits = self.classes(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss_cls"] = F.cross_entropy(logits, labels)
            out["loss_aux"] = F.mse_loss(self.aux(h).squeeze(-1), x.sum(-1))
        return out


def model():
    return TwoTerms()


def pairs(n: int, seed: int) -> TensorDictDataset:
    """Features and how many of the first two are positive (0, 1 or 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDictDataset(x=x, labels=(x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def data():
    return pairs(512, seed=0), pairs(128, seed=1)


if __name__ == "__main__":
    from leantrain import fit, load_config

    train, val = data()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.epochs=6"])
    summary = fit(model(), train, val, cfg)
    print(f"trained on: {summary['loss']}; validation loss {summary['val_loss']:.3f}")
