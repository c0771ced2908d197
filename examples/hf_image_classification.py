"""A stock Hugging Face ViT classifying scikit-learn's bundled digits, batches of pixel_values.

Each sample is a dict `{"pixel_values": (1, 8, 8), "labels": class}`, as Hugging Face image
datasets and processors produce them; `ViTForImageClassification` computes its own loss.

    leantrain train --model hf_image_classification:model \\
        --data hf_image_classification:data --set optim.name=adamw --set optim.lr=2e-3
    python hf_image_classification.py

(run from this folder; the test suite runs both on tiny settings).
"""

import torch
from sklearn.datasets import load_digits

from leantrain.data.loaders import TensorDictDataset


def model():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=48, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=96, num_labels=10))


def data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1437], order[1437:]
    return (TensorDictDataset(pixel_values=x[train], labels=y[train]),
            TensorDictDataset(pixel_values=x[val], labels=y[val]))


if __name__ == "__main__":
    from leantrain import fit, load_config

    train, val = data()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=2e-3", "train.epochs=6"])
    summary = fit(model(), train, val, cfg)
    print(f"validation accuracy {summary['val_accuracy']:.1%} (chance: 10%)")
