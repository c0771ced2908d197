"""Optimizer offload (`plan.optimizer_offload`, torchao's CPUOffloadOptimizer): refused with
the reason wherever it cannot run (it needs a CUDA GPU, which CI does not have), and wired to
torchao with the optimizer the config names."""

import pytest
import torch
from conftest import refused_on_this_machine
from torch import nn

from leantrain.config import OptimConfig, PlanConfig
from leantrain.errors import LeantrainError
from leantrain.run.plan import resolve_plan
from leantrain.techniques import REGISTRY, optimizer_offload
from leantrain.techniques.base import Context
from leantrain.techniques.optimizer import build_optimizer

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="checks the answer of a machine without a CUDA GPU")


def _ctx(device="cuda", strategy=None, clip_norm=None) -> Context:
    return Context(torch.device(device), nn.Linear(4, 4), "adamw", strategy, 1, None, clip_norm)


def test_it_is_refused_off_cuda_under_launch_and_with_clipping_naming_the_reason():
    ok, why = optimizer_offload.check(_ctx("cpu"))
    assert not ok and "this device is cpu" in why
    ok, why = optimizer_offload.check(_ctx(strategy="ddp"))
    assert not ok and "fsdp shards the states" in why
    ok, why = optimizer_offload.check(_ctx(clip_norm=1.0))
    assert not ok and "train.clip_norm" in why
    assert optimizer_offload.check(_ctx())[0]  # a lone CUDA GPU without clipping
    with pytest.raises(LeantrainError, match="offload keeps fp32 states"):
        optimizer_offload.decide(_ctx(), PlanConfig(optimizer_offload=True,
                                                    optimizer_states="8bit"))
    with pytest.raises(LeantrainError, match="plan.optimizer_offload: cannot be applied"):
        resolve_plan(PlanConfig(device="cpu", optimizer_offload=True), nn.Linear(4, 4))
    assert REGISTRY["optimizer_offload"].VARIANTS[0].overrides == {
        "plan": {"optimizer_offload": True}}  # the bench tries it (and lists it unsupported)


@CPU_ONLY
def test_asking_for_it_here_exits_2_with_one_line(tmp_path, capsys):
    why = refused_on_this_machine(capsys, tmp_path, "--set", "plan.optimizer_offload=true")
    assert "offloading moves the optimizer from a CUDA GPU" in why


def test_the_offloaded_optimizer_is_torchao_s_with_the_configured_class(monkeypatch):
    import torchao.optim

    made = {}

    def fake(params, optimizer_class, **kwargs):
        made.update(cls=optimizer_class, params=list(params), **kwargs)
        return "offloaded"

    monkeypatch.setattr(torchao.optim, "CPUOffloadOptimizer", fake)
    model = nn.Linear(4, 4)
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1)
    assert build_optimizer(model.parameters(), cfg, "fused", offload=True) == "offloaded"
    assert made["cls"] is torch.optim.AdamW and made["lr"] == 1e-3
    assert made["weight_decay"] == 0.1 and made["fused"] is True  # the CPU's fused AdamW
    assert made["offload_gradients"] is False  # gradient accumulation keeps working
    assert len(made["params"]) == 2
