"""torch.compile's modes (`plan.compile_mode`): max-autotune runs everywhere Inductor does;
CUDA graphs (reduce-overhead) are refused off CUDA and under launch, with the reason."""

import copy
import json

import pytest
import torch
from conftest import refused_on_this_machine
from torch import nn

from leantrain.cli import main
from leantrain.config import PlanConfig
from leantrain.errors import LeantrainError
from leantrain.run.compiling import CompiledStep
from leantrain.run.plan import resolve_plan
from leantrain.techniques import REGISTRY, compile_mode
from leantrain.techniques.base import Context

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="checks the answer of a machine without a CUDA GPU")


def _ctx(device: str, strategy: str | None = None) -> Context:
    return Context(torch.device(device), nn.Linear(4, 4), "adamw", strategy, 1, None)


def test_cuda_graphs_are_refused_off_cuda_and_under_launch_with_the_reason():
    ok, why = compile_mode.check(_ctx("cpu"), "reduce-overhead")
    assert not ok and "CUDA graphs need a CUDA device; this device is cpu" in why
    assert compile_mode.check(_ctx("cpu"), "max-autotune")[0]  # no CUDA graphs off a GPU
    for mode in compile_mode.CUDA_GRAPHS:
        ok, why = compile_mode.check(_ctx("cuda", "ddp"), mode)
        assert not ok and "ddp" in why and "max-autotune-no-cudagraphs" in why
    assert compile_mode.check(_ctx("cuda", "fsdp"), "max-autotune-no-cudagraphs")[0]
    with pytest.raises(LeantrainError, match="only applies with plan.compile true or auto"):
        resolve_plan(PlanConfig(device="cpu", compile=False, compile_mode="max-autotune"),
                     nn.Linear(4, 4))
    # compile auto: the mode is the one a measured compile would use; the rule stays eager
    ruled = resolve_plan(PlanConfig(device="cpu", compile_mode="max-autotune"), nn.Linear(4, 4))
    assert not ruled.compile and ruled.compile_mode == "max-autotune"
    plan = resolve_plan(PlanConfig(device="cpu", compile=True, compile_mode="max-autotune"),
                        nn.Linear(4, 4))
    assert plan.compile and plan.compile_mode == "max-autotune"
    assert plan.to_dict()["compile_mode"] == "max-autotune"


def test_the_bench_tries_both_modes():
    names = [v.name for v in REGISTRY["compile_mode"].VARIANTS]
    assert names == ["compile (max-autotune)", "compile (reduce-overhead)"]
    for v in REGISTRY["compile_mode"].VARIANTS:
        assert v.overrides["plan"]["compile"] is True  # a compiling trial: one round, timed


@CPU_ONLY
def test_the_bench_finds_reduce_overhead_unsupported_here_without_training():
    from leantrain.bench.trials import unsupported_reason
    from leantrain.config import TrainConfig
    from leantrain.data import load_data
    from leantrain.recipes.models import SmallCNN

    cfg = TrainConfig()
    graphs = REGISTRY["compile_mode"].VARIANTS[1]
    why = unsupported_reason([graphs], {}, lambda: SmallCNN(1, 10), load_data(cfg.data), cfg)
    assert why and "CUDA graphs need a CUDA device" in why


@CPU_ONLY
def test_asking_for_cuda_graphs_here_exits_2_naming_the_reason(tmp_path, capsys):
    why = refused_on_this_machine(capsys, tmp_path, "--compile-mode", "reduce-overhead")
    assert "CUDA graphs need a CUDA device" in why


def test_under_cuda_graphs_each_step_is_marked_and_its_loss_copied(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    step = CompiledStep(nn.Linear(4, 4), torch.device("cuda"), 0, "reduce-overhead")
    loss = torch.ones(())
    step.before_forward()
    assert marks == [1] and step.kept(loss).data_ptr() != loss.data_ptr()
    plain = CompiledStep(nn.Linear(4, 4), torch.device("cpu"), 0, "max-autotune")
    plain.before_forward()
    assert marks == [1] and plain.kept(loss) is loss
    for s in (step, plain):
        s.close()


@pytest.mark.slow
def test_max_autotune_trains_and_counts_its_compile_time(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--compile-mode", "max-autotune", "--epochs", "1", "--set",
                 "train.max_steps=12", "--set", "plan.precision=fp32", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["compile_mode"] == "max-autotune"
    assert summary["compile"]["seconds"] > 0


def test_repeated_blocks_compile_once_in_place_and_compute_as_eager():
    """FSDP2's per-block compile (`CompiledStep(per_block=True)`): the repeated blocks'
    forwards compiled in place share one graph, the parameter names stay plain, and the
    outputs and gradients equal the eager model's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoder(layer, 3,
                                                                  enable_nested_tensor=False))
    eager = copy.deepcopy(model)
    step = CompiledStep(model, torch.device("cpu"), 0, per_block=True)
    assert [type(b) for b in step.blocks] == [nn.TransformerEncoderLayer] * 3  # not the Linear
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(2, 5, 4)
    out = step.model(x)
    assert step.model is model and list(model.state_dict()) == list(eager.state_dict())
    assert counters["stats"]["unique_graphs"] == 1  # three blocks, one graph
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    eager(x).sum().backward()
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
