"""Out-of-memory recovery during training, with an injected OOM: the batch is cut into
micro-batches whose gradients accumulate, so the step (and the run) is the one it would have
been; the split is logged once, kept by the checkpoint, and bounded."""

import json
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from leantrain import fit, load_config
from leantrain.data.loaders import split_batch
from leantrain.errors import LeantrainError


class RunsOutOfMemory(nn.Module):
    """An MLP whose forward raises the CUDA out-of-memory error on batches above `limit`
    samples, as a device without room for their activations would."""

    def __init__(self, limit: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.limit = limit

    def forward(self, x):
        if self.training and self.limit is not None and len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} MiB")
        return self.net(x)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


def _cfg(*extra):
    return load_config(None, ["data.batch_size=32", "train.epochs=2", "optim.lr=0.05",
                              "train.monitor_interval_s=0", "plan.precision=fp32", *extra])


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_split_batch_cuts_every_tensor_of_a_nested_batch_alike():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.arange(5),
             "meta": "kept"}
    parts = split_batch(batch, 2)
    assert [len(p["labels"]) for p in parts] == [3, 2] and parts[1]["meta"] == "kept"
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert len(split_batch((torch.zeros(3, 1), torch.zeros(3)), 8)) == 3  # at most one each


def test_an_oom_halves_the_micro_batch_keeps_the_global_batch_and_the_same_weights(
        tmp_path, caplog):
    train, val = _data()
    plain = RunsOutOfMemory(limit=None)
    fit(plain, train, val, _cfg(), progress_bar=False)
    squeezed = RunsOutOfMemory(limit=10)  # 32 -> 16 -> 8 samples per micro-batch
    with caplog.at_level("WARNING", logger="leantrain"):
        summary = fit(squeezed, train, val, _cfg(), tmp_path / "run", progress_bar=False)
    assert summary["micro_split"] == 4 and summary["steps"] == 12  # the same 6 steps an epoch
    assert torch.allclose(_weights(squeezed), _weights(plain), atol=1e-5)
    warnings = [r.message for r in caplog.records
                if r.name == "leantrain.run.recovery" and "out of memory" in r.message]
    assert len(warnings) == 2 and "runs as 4 micro-batches" in warnings[-1]  # once per split
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["micro_split"] == 4  # a resume keeps the split
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["micro_split"] == 4


def test_an_oom_within_gradient_accumulation_replays_the_whole_step(tmp_path):
    train, val = _data()
    plain = RunsOutOfMemory(limit=None)
    fit(plain, train, val, _cfg("plan.grad_accum=2"), progress_bar=False)
    squeezed = RunsOutOfMemory(limit=20)
    summary = fit(squeezed, train, val, _cfg("plan.grad_accum=2"), progress_bar=False)
    assert summary["micro_split"] == 2
    assert torch.allclose(_weights(squeezed), _weights(plain), atol=1e-5)


def test_recovery_is_bounded_at_one_sample_per_micro_batch():
    train, val = _data()
    with pytest.raises(LeantrainError, match="even with micro-batches of one sample"):
        fit(RunsOutOfMemory(limit=0), train, val, _cfg(), progress_bar=False)


class LeavesActivationsBehind(nn.Module):
    """An MLP whose first training forward (or the first above `limit` samples) allocates a
    large activation and then runs out of memory, as a GPU that fills up mid-forward does.
    It records whether that activation was still alive when the next forward began: the
    memory a retry must have back."""

    def __init__(self, limit: int = 0, calls_that_fail: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.limit, self.fails_left = limit, calls_that_fail
        self.failed: weakref.ref | None = None
        self.alive_at_retry: list[bool] = []

    def forward(self, x):
        if self.failed is not None:
            self.alive_at_retry.append(self.failed() is not None)
            self.failed = None
        if self.training and self.fails_left and len(x) > self.limit:
            self.fails_left -= 1
            activation = torch.empty(len(x), 1 << 16)  # what the failed forward held
            self.failed = weakref.ref(activation)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} MiB")
        return self.net(x)


def test_the_failed_attempts_memory_is_freed_before_the_retry_and_the_result_is_the_same():
    train, val = _data()
    plain = RunsOutOfMemory(limit=None)
    fit(plain, train, val, _cfg(), progress_bar=False)
    # 32 samples once in the first batch's check in training mode (an out-of-memory error
    # there is left to the loop), then 32 -> 16 -> 8, twice: in the FLOP count, in training
    model = LeavesActivationsBehind(limit=10, calls_that_fail=5)
    summary = fit(model, train, val, _cfg(), progress_bar=False)
    assert model.alive_at_retry == [False] * 5  # nothing of any failed attempt survived
    assert summary["micro_split"] == 4
    assert torch.allclose(_weights(model.net), _weights(plain.net), atol=1e-5)


def test_flops_are_counted_on_a_micro_batch_that_fits_after_freeing_the_one_that_did_not():
    train, val = _data()
    plain = fit(RunsOutOfMemory(limit=None), train, val, _cfg(), progress_bar=False)
    # the first batch's check in training mode: 32, then the FLOP count's: 32, 16
    model = LeavesActivationsBehind(limit=10, calls_that_fail=3)
    summary = fit(model, train, val, _cfg(), progress_bar=False)
    assert model.alive_at_retry == [False] * 3
    assert summary["micro_split"] == 1  # only the count ran out: training never did
    assert summary["flops_per_sample"] == plain["flops_per_sample"] > 0
