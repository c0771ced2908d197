"""`leantrain.prepare` in a hand-written loop: the docs' snippet, and what it applies."""

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_cnn

import leantrain
from leantrain.errors import LeantrainError

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "bring-your-model.md"


def test_the_docs_prepare_snippet_runs():
    pytest.importorskip("transformers")
    text = GUIDE.read_text()
    block = re.search(r"<!-- the test suite runs this block \(tests/test_prepare.py\) -->\n"
                      r"```python\n(.*?)```", text, re.S)
    assert block, "the prepare snippet of docs/bring-your-model.md is missing"
    scope: dict = {}
    exec(compile(block.group(1), str(GUIDE), "exec"), scope)
    assert scope["loss"].requires_grad and "applied" in scope["run"].outcomes["device"]


def test_prepare_applies_the_plan_and_keeps_the_users_optimizer():
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no nesterov, no weight decay
    run = leantrain.prepare(model, optimizer, plan={"device": "cpu", "precision": "fp32"})
    assert run.optimizer is optimizer and optimizer.defaults["weight_decay"] == 0
    assert run.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = run.to_device((torch.randn(4, 1, 12, 12), torch.zeros(4, dtype=torch.long)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    before = run.model[0].weight.detach().clone()
    with run.autocast():
        loss = torch.nn.functional.cross_entropy(run.model(x), y)
    run.backward(loss)
    run.step()
    assert not torch.equal(before, run.model[0].weight) and run.model[0].weight.grad is None


def test_the_outcomes_say_the_users_optimizer_runs_as_it_was_built():
    model = tiny_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    run = leantrain.prepare(model, optimizer, plan={"device": "cpu"})
    said = run.outcomes["optimizer_impl"]
    assert said.startswith("not applied: your AdamW runs as you built it (foreach=False")
    assert "fused" not in said.split("(")[0]  # never "applied: fused" for kernels not chosen


def test_prepare_refuses_what_cannot_run_here():
    with pytest.raises(LeantrainError, match="plan.precision 'fp16': cannot be applied"):
        leantrain.prepare(tiny_cnn(), plan={"device": "cpu", "precision": "fp16"})
    with pytest.raises(LeantrainError, match="unknown config key 'plan.precison'"):
        leantrain.prepare(tiny_cnn(), plan={"precison": "bf16"})


def test_prepare_refuses_optimizer_settings_only_its_own_optimizer_honours():
    model = tiny_cnn()
    before = model[0].weight.detach().clone()
    for plan, key in (({"optimizer_states": "bf16"}, "plan.optimizer_states 'bf16'"),
                      ({"optimizer_states": "8bit"}, "plan.optimizer_states '8bit'"),
                      ({"optimizer_offload": True}, "plan.optimizer_offload")):
        with pytest.raises(LeantrainError, match=f"{key} needs the optimizer leantrain builds"):
            leantrain.prepare(model, plan={"device": "cpu", **plan})
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, before)


def test_under_cuda_graphs_the_step_marks_the_next_one(monkeypatch):
    from leantrain.run.plan import ResolvedPlan
    from leantrain.run.prepare import Prepared

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def plan(mode: str) -> ResolvedPlan:
        return ResolvedPlan(device=torch.device("cuda"), precision="fp32", channels_last=False,
                            compile=True, cudnn_benchmark=False, tf32=False,
                            optimizer_impl="foreach", grad_accum=1, compile_mode=mode)

    Prepared(model, optimizer, None, plan("reduce-overhead")).step()
    assert marks == [1]
    Prepared(model, optimizer, None, plan("max-autotune-no-cudagraphs")).step()
    assert marks == [1]
