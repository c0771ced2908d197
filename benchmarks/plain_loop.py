"""The reference every "never a worse model" claim is measured against: a user's plain loop.

`CASES` are the model types users bring, each with the optimizer and learning rate its user
would pick: stock Hugging Face models returned as is (a BERT classifier, a GPT-2 and a GQA
Llama on padded batches, a ViT, a BART encoder-decoder), a CNN with SGD and a regression MLP
with Adam. `train_plain` is the dozen lines such a user writes (shuffled DataLoader, the
optimizer at torch's defaults but for lr, the model's own loss or the task's); it takes an
optional learning-rate multiplier so benchmarks/schedules.py can compare schedules on it, and
`val_loss` scores any trained model the same way, whoever trained it.

Used by benchmarks/schedules.py and tests/test_learning_check.py (not part of the package).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple]  # (train, val, collate_fn or None)
    optimizer: str  # a key of OPTIMIZERS
    lr: float
    epochs: int  # a short run; benchmarks/schedules.py also runs 4x as long
    batch_size: int = 64
    momentum: float | None = None  # sgd: what the user passes (None: torch's default, 0)


def _labelled(batch):
    """A dict batch with the labels the model's own loss needs: a causal LM's are its
    input_ids with padding excluded (-100), as a user's loop sets them."""
    if "labels" in batch:
        return batch
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def batch_loss(model: nn.Module, batch) -> torch.Tensor:
    """The loss a user's loop computes: the model's own for dict batches, else the task's."""
    if isinstance(batch, dict):
        return model(**_labelled(batch)).loss
    x, y = batch
    out = model(x)
    if y.is_floating_point():
        return F.mse_loss(out.squeeze(-1), y)
    return F.cross_entropy(out, y)


def make_optimizer(case: Case, params, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The case's optimizer at torch's defaults but for lr (and momentum, `weight_decay`)."""
    extra = {"momentum": case.momentum} if case.momentum is not None else {}
    if weight_decay is not None:
        extra["weight_decay"] = weight_decay
    return OPTIMIZERS[case.optimizer](params, lr=case.lr, **extra)


def train_plain(case: Case, seed: int, epochs: int | None = None,
                lr_multiplier: Callable[[int, int], float] | None = None,
                weight_decay: float | None = None,
                order: Callable[[int], torch.Tensor] | None = None) -> nn.Module:
    """The user's loop; `lr_multiplier(step, total_steps)` scales the lr (None: constant).
    `order(epoch)`, when given, is each epoch's sample order (else a seeded shuffle): a test
    gives the plain loop the batches leantrain trains on, so only the loops differ."""
    train, _, collate = case.data()
    torch.manual_seed(seed)
    model = case.model()
    optimizer = make_optimizer(case, model.parameters(), weight_decay)
    sampler = _Order(len(train), order) if order else None
    loader = DataLoader(train, batch_size=case.batch_size, shuffle=sampler is None,
                        sampler=sampler, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    total = len(loader) * (epochs or case.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total)) if lr_multiplier else None
    model.train()
    for _ in range(epochs or case.epochs):
        for batch in loader:
            optimizer.zero_grad()
            batch_loss(model, batch).backward()
            optimizer.step()
            if scheduler:
                scheduler.step()
    return model


class _Order(torch.utils.data.Sampler):
    """Each epoch's sample order from `order(epoch)`."""

    def __init__(self, n: int, order: Callable[[int], torch.Tensor]):
        self.n, self.order, self.epoch = n, order, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        indices = self.order(self.epoch).tolist()
        self.epoch += 1
        return iter(indices)


def val_loss(case: Case, model: nn.Module) -> float:
    """Mean validation loss per sample (batches weighted by their size), in eval mode."""
    _, val, collate = case.data()
    model.eval()
    total = count = 0
    with torch.no_grad():
        for batch in DataLoader(val, batch_size=256, collate_fn=collate):
            n = len(batch["labels"] if isinstance(batch, dict) and "labels" in batch else
                    batch["input_ids"] if isinstance(batch, dict) else batch[1])
            total += float(batch_loss(model, batch)) * n
            count += n
    return total / count


# ------------------------------------------------------------------ the cases


def _digits_cnn_data():
    from leantrain.config import DataConfig
    from leantrain.data import load_data

    bundle = load_data(DataConfig())
    return bundle.train, bundle.val, None


def _digits_cnn():
    from leantrain.recipes.models import SmallCNN

    return SmallCNN(1, 10)


def _friedman_data():
    """scikit-learn's Friedman #1 regression (generated, noise 1.0), targets standardised."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=2000, noise=1.0, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    y = (y - y[:1600].mean()) / y[:1600].std()
    return TensorDataset(x[:1600], y[:1600]), TensorDataset(x[1600:], y[1600:]), None


def _mlp():
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


def _example(module: str, fn: str = "model", *args):
    return lambda: getattr(__import__(module), fn)(*args)


def _gpt2_data():
    import hf_causal_lm

    return (*hf_causal_lm.data(60_000), None)


def _with_collate(module: str):
    """The example's data(): (train, val) plus a collate function, or (train, val)."""
    def data():
        found = __import__(module).data()
        return found if len(found) == 3 else (*found, None)
    return data


CASES = {c.name: c for c in [
    Case("cnn-sgd", _digits_cnn, _digits_cnn_data, "sgd", 0.05, 2, momentum=0.9),
    Case("mlp-regression-adam", _mlp, _friedman_data, "adam", 1e-3, 4),
    Case("bert-classifier", _example("hf_sequence_classification"),
         _with_collate("hf_sequence_classification"), "adamw", 1e-3, 6),
    Case("gpt2-causal-lm", _example("hf_causal_lm"), _gpt2_data, "adamw", 1e-3, 2),
    Case("vit-image", _example("hf_image_classification"),
         _with_collate("hf_image_classification"), "adamw", 1e-3, 3),
    Case("llama-gqa-padded", _example("hf_padded_causal_lm"),
         _with_collate("hf_padded_causal_lm"), "adamw", 1e-3, 4, batch_size=32),
    Case("bart-seq2seq", _example("hf_seq2seq"), _with_collate("hf_seq2seq"), "adamw", 1e-3, 4,
         batch_size=32),
]}
