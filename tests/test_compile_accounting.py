"""torch.compile accounting: graphs, recompiles and why, graph breaks, the break-even step count,
one warning for a run that keeps recompiling; in train, bench and doctor.

Dynamo's "eager" backend traces, guards, recompiles and breaks graphs exactly as the default
one, without Inductor's code generation (tens of seconds on 2 cores); the tests use it where
they test the accounting. One slow test compiles for real.
"""

import json
import logging

import pytest
import torch
from conftest import mlp
from torch import nn

from leantrain import fit, load_config
from leantrain.measure.compile_watch import CompileWatch, break_even_steps, describe
from leantrain.measure.report import format_summary
from leantrain.run import compiling
from leantrain.run.compiling import EAGER_STEPS


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with Dynamo's eager backend wherever leantrain compiles a model."""
    def compile_eagerly(model, mode=None):
        return torch.compile(model, backend="eager")
    monkeypatch.setattr(compiling, "apply_compile", compile_eagerly)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_watch_names_recompile_reasons_and_graph_breaks():
    torch._dynamo.reset()

    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    compiled = torch.compile(f, backend="eager")
    watch = CompileWatch().start()
    compiled(torch.randn(4))
    compiled(torch.randn(4, dtype=torch.float64))  # a new dtype: a recompile
    stats = watch.stop()
    assert stats.recompiles == 2  # f, and the frame that resumes after its graph break
    assert all("dtype mismatch" in reason for reason in stats.recompile_reasons)
    assert not stats.recompile_reasons[0].startswith("0/")  # the compile id is dropped
    assert sum(stats.graph_breaks.values()) >= 1
    assert any("graph_break()" in reason for reason in stats.graph_breaks)
    assert stats.graphs >= 2
    text = describe(stats.to_dict())
    assert "2 recompiles (most often: tensor 'x' dtype mismatch" in text and "graph break" in text
    # the watch leaves torch's logging as it found it
    assert logging.getLogger("torch._dynamo.guards.__recompiles").propagate is True


def test_the_watch_counts_only_what_happened_while_it_watched():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2, backend="eager")
    compiled(torch.randn(3))
    compiled(torch.randn(3, dtype=torch.float64))  # before the watch: not counted
    watch = CompileWatch().start()
    compiled(torch.randn(3))
    stats = watch.stop()
    assert (stats.graphs, stats.recompiles, stats.graph_breaks) == (0, 0, {})


def test_break_even_is_compile_time_over_the_time_saved_per_step():
    assert break_even_steps(10.0, 0.003, 0.002) == 10_000
    assert break_even_steps(10.0, 0.002, 0.002) is None  # never pays
    assert break_even_steps(10.0, 0.002, 0.003) is None


def _cfg(*overrides):
    return load_config(None, ["plan.device=cpu", "data.batch_size=32", "train.epochs=3",
                              "optim.lr=0.05", "plan.compile=true", *overrides])


def test_a_compiled_run_reports_compile_time_recompiles_breaks_and_break_even(
        tabular, tmp_path, eager_backend):
    summary = fit(mlp(), *tabular, _cfg(), tmp_path / "run", progress_bar=False)
    found = summary["compile"]
    assert found["recompiles"] == 0 and found["graph_breaks"] == {}
    assert found["graphs"] >= 1
    assert found["eager_step_seconds"] > 0 and found["compiled_step_seconds"] > 0
    assert found["seconds"] == summary["compile_seconds"] > 0
    eager, compiled = found["eager_step_seconds"], found["compiled_step_seconds"]
    expected = break_even_steps(found["seconds"] - compiled, eager, compiled)
    assert found["break_even_steps"] == expected
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["compile"] == found
    table = format_summary(summary)
    assert "compile pays?" in table and "ms eager" in table


def test_the_first_steps_run_eagerly_then_the_compiled_model_takes_over(
        tabular, tmp_path, eager_backend, monkeypatch):
    used = []
    original = compiling.CompiledStep.model.fget
    monkeypatch.setattr(compiling.CompiledStep, "model", property(
        lambda self: used.append(self.eager_left == 0) or original(self)))
    summary = fit(mlp(), *tabular, _cfg(), tmp_path / "run", progress_bar=False)
    assert summary["steps"] == 3 * 6  # full batches only: 200 // 32 per epoch
    switch = used.index(True)
    assert not any(used[:switch]) and all(used[switch:])  # eager first, then compiled
    assert summary["compile"]["eager_step_seconds"] is not None


def test_a_run_shorter_than_the_eager_steps_says_it_never_compiled(tabular, tmp_path,
                                                                    eager_backend):
    summary = fit(mlp(), *tabular, _cfg(f"train.max_steps={EAGER_STEPS - 1}"),
                  tmp_path / "run", progress_bar=False)
    assert "not compiled" in summary["compile"]["note"]
    assert "not compiled" in format_summary(summary)


class _Moody(nn.Module):
    """Each forward reads a Python attribute that cycles through three values: every new
    value fails a guard, so Dynamo recompiles."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = mlp(), 0

    def forward(self, x):
        self.calls += 1
        mode = ("double", "half", "same")[self.calls // 3 % 3]
        scale = {"double": 2.0, "half": 0.5, "same": 1.0}[mode]
        return self.net(x) * scale


def test_a_run_that_keeps_recompiling_gets_one_warning_naming_the_reason(
        tabular, tmp_path, eager_backend, caplog):
    with caplog.at_level(logging.WARNING, logger="leantrain"):
        summary = fit(_Moody(), *tabular, _cfg(), tmp_path / "run", progress_bar=False)
    assert summary["compile"]["recompiles"] >= 2
    warnings = [r.getMessage() for r in caplog.records if "recompiled" in r.getMessage()]
    assert len(warnings) == 1
    assert summary["compile"]["recompile_reasons"][0] in warnings[0]


def test_bench_reports_the_compiled_trials_accounting(monkeypatch, eager_backend):
    from test_bench import small_cfg, tabular_bundle

    from leantrain.bench import search
    from leantrain.bench.report import format_bench
    from leantrain.bench.search import run_bench
    from leantrain.techniques import REGISTRY
    monkeypatch.setattr(search, "REGISTRY", {"compile": REGISTRY["compile"]})
    monkeypatch.setattr(search, "COMPILE_PRIOR_S", 1.0)  # the eager backend compiles at once
    result = run_bench(mlp, tabular_bundle(), small_cfg(), budget_s=30, tune_batch_size=False)
    compiled = result.trial("compile")
    assert compiled.status == "ok", compiled.reason
    assert compiled.compile["recompiles"] == 0 and compiled.compile["graphs"] >= 1
    assert "break_even_steps" in compiled.compile
    assert "torch.compile:" in format_bench(result)


def test_doctor_reports_compile_accounting_against_eager_steps(tmp_path, eager_backend, capsys):
    from leantrain.cli import main
    out = tmp_path / "doctor"
    assert main(["doctor", "--steps", "3", "--no-profile", "--no-compile-check", "--epochs", "1",
                 "--set", "plan.compile=true", "--set", "plan.precision=fp32",
                 "--out", str(out)]) == 0
    found = json.loads((out / "doctor.json").read_text())["measured"]["compile"]
    assert found["eager_step_seconds"] > 0 and found["compiled_step_seconds"] > 0
    assert found["recompiles"] == 0
    assert "ms compiled per step" in capsys.readouterr().out


@pytest.mark.slow
def test_train_compiles_for_real_and_accounts_for_it(tabular, tmp_path):
    torch._dynamo.reset()
    summary = fit(mlp(), *tabular, _cfg(), tmp_path / "run", progress_bar=False)  # Inductor
    found = summary["compile"]
    assert found["seconds"] > 0 and found["graphs"] >= 1 and found["recompiles"] == 0
    assert found["compiled_step_seconds"] > 0 and found["eager_step_seconds"] > 0
    assert summary["val_accuracy"] > 0.9
