"""fp8 training (torchao float8) as `plan.precision=fp8`: which layers it converts, and on a
machine that cannot run it fast, "unsupported here" with the reason everywhere."""

import pytest
import torch
from conftest import refused_on_this_machine
from torch import nn

from leantrain.config import PlanConfig
from leantrain.errors import LeantrainError
from leantrain.run.plan import resolve_plan
from leantrain.techniques import precision
from leantrain.techniques.base import Context


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(),
                         nn.Linear(128, 60), nn.ReLU(), nn.Linear(60, 32), nn.Linear(32, 10))


def test_the_rule_keeps_the_first_and_last_linear_and_odd_sizes_in_bf16():
    # first (20->64) and last (32->10) stay; 128->60 and 60->32 are not multiples of 16
    assert precision.float8_layers(_mlp()) == ["2"]


def test_apply_float8_converts_exactly_those_layers_and_the_model_still_runs():
    from torchao.float8.float8_linear import Float8Linear

    model = _mlp()
    assert precision.apply_float8(model, "fp8-rowwise") == ["2"]
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert converted == ["2"] and type(model[0]) is nn.Linear
    out = model(torch.randn(16, 20))  # emulated on CPU: it runs, it is not fast
    assert out.shape == (16, 10) and torch.isfinite(out).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine "
                                                      "without a CUDA GPU")
def test_without_a_capable_gpu_fp8_is_unsupported_with_the_reason():
    ok, why = precision.check(Context(torch.device("cpu"), _mlp(), "sgd", None, 1, None), "fp8")
    assert not ok and "compute capability 8.9" in why and "this device is cpu" in why
    with pytest.raises(LeantrainError, match="compute capability 8.9"):
        resolve_plan(PlanConfig(device="cpu", precision="fp8"), _mlp())
    assert precision.VARIANTS[-1].name == "fp8"  # the bench tries it, and lists it so


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine "
                                                      "without a CUDA GPU")
def test_asking_for_fp8_here_exits_2_naming_the_reason(tmp_path, capsys):
    why = refused_on_this_machine(capsys, tmp_path, "--precision", "fp8")
    assert "fp8" in why and "compute capability 8.9" in why


def test_fp8_runs_are_scored_against_the_bf16_peak():
    from leantrain.measure.flops import gpu_peak

    peak = gpu_peak("NVIDIA H100 80GB HBM3", "fp8", tf32=False)
    bf16 = gpu_peak("NVIDIA H100 80GB HBM3", "bf16", tf32=False)
    assert peak is not None and peak.flops_per_second == bf16.flops_per_second
    assert "fp8 run" in peak.label


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine "
                                                      "without a CUDA GPU")
def test_the_bench_finds_fp8_unsupported_here_without_training():
    from leantrain.bench.trials import unsupported_reason
    from leantrain.config import TrainConfig
    from leantrain.data import load_data
    from leantrain.recipes.models import SmallCNN

    cfg = TrainConfig()
    fp8 = next(v for v in precision.VARIANTS if v.name == "fp8")
    why = unsupported_reason([fp8], {}, lambda: SmallCNN(1, 10), load_data(cfg.data), cfg)
    assert why and "compute capability 8.9" in why
