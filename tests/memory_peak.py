"""Measure a training step's real peak on the CPU and print it beside leantrain's estimate.

Run as a script (a fresh process, so nothing else in the process holds memory), with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_, set by the test): every tensor above 64 KiB then
has its own mapping, returned to the OS when freed, so the resident set follows the live
tensors. A first pass loads the libraries and kernels (their pages count in the RSS); the
second pass is measured: its high-water mark less the RSS before it.
"""

import gc
import json
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from leantrain.bench.memory_estimate import estimate
from leantrain.config import config_from_dict
from leantrain.data import DataBundle
from leantrain.data.loaders import TensorDictDataset
from leantrain.measure.memory import current_rss_bytes, peak_bytes, reset_peak
from leantrain.run.plan import build
from leantrain.run.trainer import Trainer

CPU = torch.device("cpu")


def mlp():
    return nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096), nn.GELU(),
                         nn.Linear(4096, 10))


def cnn():
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(3, 64), *block(64, 128), nn.MaxPool2d(2), *block(128, 256),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=128, num_labels=2))


def lora():
    """GPT-2 with a LoRA adapter: its memory is mostly the frozen base (weights without
    gradients or optimizer states)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=128, n_embd=512, n_layer=2,
                                      n_head=8))
    return get_peft_model(base, LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))


def data(kind: str, n: int = 1024):
    g = torch.Generator().manual_seed(0)
    if kind == "lora":
        ids = torch.randint(0, 8192, (n, 128), generator=g)
        return TensorDictDataset(input_ids=ids, labels=ids)
    if kind == "bert":
        ids = torch.randint(1, 8192, (n, 128), generator=g)
        return TensorDictDataset(input_ids=ids, labels=torch.randint(0, 2, (n,), generator=g))
    shape = (1024,) if kind == "mlp" else (3, 32, 32)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,),
                                                                              generator=g))


SETTINGS = {"mlp": (mlp, 256, "adamw"), "cnn": (cnn, 64, "sgd"), "bert": (bert, 32, "adamw"),
            "lora": (lora, 8, "adamw")}


def main(kind: str) -> None:
    build_model, batch, optim = SETTINGS[kind]
    bundle = DataBundle(train=data(kind), val=data(kind, 64), num_classes=None,
                        description=kind)
    cfg = config_from_dict({"data": {"batch_size": batch}, "train": {"epochs": 1},
                            "optim": {"name": optim, "lr": 1e-3},
                            "plan": {"device": "cpu", "precision": "fp32"}})
    predicted = estimate(build_model, bundle, cfg)

    def steps():
        run = build(cfg, build_model(), bundle.train, bundle.val, measure_loader=False)
        stepper = Trainer(run, progress_bar=False).steps()
        for _ in range(3):
            next(stepper)
        stepper.close()

    steps()
    gc.collect()
    before = current_rss_bytes()
    reset_peak(CPU)
    steps()
    measured = peak_bytes(CPU)[0] - before
    print(json.dumps({"estimate": predicted.peak_bytes, "measured": measured,
                      "memory": predicted.to_dict()}))


if __name__ == "__main__":
    main(sys.argv[1])
