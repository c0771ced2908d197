"""The default plan decided by measurement where a rule can lose, and its cache."""

import json
import logging

import pytest
import torch
from conftest import blobs, mlp, small_images, tiny_cnn
from torch.utils.data import TensorDataset

from leantrain import fit, load_config
from leantrain.run import defaults


def _cfg(*extra):
    return load_config(None, ["plan.device=cpu", "train.monitor_interval_s=0",
                              "data.batch_size=32", *extra])


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """A run this short pays for measuring: every budget opened up, the cache in tmp_path."""
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setattr(defaults, "BUDGET_SHARE", 1000.0)
    monkeypatch.setattr(defaults, "WINDOW_S", (0.05, 0.05))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_short_run_keeps_the_rules_and_says_so():
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = summary["plan"]["outcomes"]["channels_last"]
    assert "rule (not measured:" in outcome and "too short" in outcome
    assert summary["plan_measurement"] is None


def test_the_measured_choices_are_in_the_summary_and_cached_for_the_next_run(measuring, caplog):
    caplog.set_level(logging.INFO, logger="leantrain")
    first = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    record = first["plan_measurement"]
    assert set(record["results"]) >= {"channels_last", "optimizer_impl"}
    for name, result in record["results"].items():
        assert len(result["ratios"]) >= defaults.MIN_ROUNDS
        assert first["plan"]["outcomes"][name].count("measured:") == 1
        chosen = result["chosen"]
        assert first["plan"][name] == chosen  # the run used what was measured
        wins = result["interval"][0] > 1.0
        assert chosen == (result["tried"] if wins else result["rule"])
    assert "measuring" in caplog.text
    assert len(list(measuring.glob("plans/*.json"))) == 1
    caplog.clear()
    second = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert "measuring" not in caplog.text and "plan cache" in caplog.text
    assert second["plan_measurement"]["from_cache"]
    for name in record["results"]:
        assert second["plan"][name] == first["plan"][name]
        assert "(from the plan cache)" in second["plan"]["outcomes"][name]


def test_the_cache_key_follows_the_model_the_shapes_and_the_settings(measuring):
    cfg, (train, _) = _cfg(), small_images()
    key = defaults.cache_key(cfg, tiny_cnn(), train[0], torch.device("cpu"), None)
    assert key == defaults.cache_key(cfg, tiny_cnn(), train[0], torch.device("cpu"), None)
    assert key != defaults.cache_key(cfg, tiny_cnn(classes=5), train[0], torch.device("cpu"),
                                     None)
    assert key != defaults.cache_key(_cfg("data.batch_size=64"), tiny_cnn(), train[0],
                                     torch.device("cpu"), None)
    wider = (torch.randn(1, 16, 16), train[0][1])
    assert key != defaults.cache_key(cfg, tiny_cnn(), wider, torch.device("cpu"), None)


def test_no_cache_measures_again_and_explicit_choices_are_never_measured(measuring):
    fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    again = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1", "plan.cache=false"),
                progress_bar=False)
    assert not again["plan_measurement"].get("from_cache")
    explicit = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1", "plan.precision=fp32",
                                                "plan.channels_last=true",
                                                "plan.optimizer_impl=foreach",
                                                "plan.compile=false"),
                   progress_bar=False)
    assert explicit["plan_measurement"] is None


def test_measuring_leaves_the_model_and_the_random_stream_as_they_were(measuring):
    x, y = blobs(320)
    data = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
    cfg = _cfg("train.epochs=2", "plan.precision=fp32", "plan.optimizer_impl=foreach",
               "plan.compile=false")
    plain = fit(mlp(), *data, cfg, progress_bar=False)  # nothing auto left to measure
    model = mlp()
    measured = fit(model, *data, _cfg("train.epochs=2", "plan.precision=fp32",
                                      "plan.compile=false"), progress_bar=False)
    assert measured["plan_measurement"] is not None
    if measured["plan"]["optimizer_impl"] == "foreach":  # the same run as `plain`
        assert measured["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


def test_a_measurement_that_cannot_pay_says_what_it_would_cost(monkeypatch, tmp_path):
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = summary["plan"]["outcomes"]["channels_last"]
    assert "not measured: the run is projected at" in outcome and "over 3% of it" in outcome
    assert json.loads(json.dumps(summary["plan_measurement"]))["look_s"] > 0


class _LoadArrives(torch.nn.Module):
    """tiny_cnn whose forward takes injected time: `fast` seconds until `slow_after` forwards,
    then 40 times that, as when a neighbour's job lands on the cores after the look measured
    the run. The clock and the count are the class's: measuring trains deep copies."""

    clock, calls = None, 0

    def __init__(self, fast: float, slow_after: int):
        super().__init__()
        self.inner, self.fast, self.slow_after = tiny_cnn(), fast, slow_after

    def forward(self, x):
        type(self).calls += 1
        type(self).clock.advance(self.fast * (40 if type(self).calls > self.slow_after else 1))
        return self.inner(x)


def test_measuring_stops_at_its_share_of_the_run_when_the_machine_slows(monkeypatch,
                                                                        tmp_path, fake_clock):
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(_LoadArrives, "calls", 0)
    monkeypatch.setattr(_LoadArrives, "clock", fake_clock)
    train, val = small_images()
    cfg = _cfg("train.epochs=1500")  # 14 steps an epoch: a run long enough to measure
    fast = 0.01
    model = _LoadArrives(fast, slow_after=60)  # the look ran at full speed
    began = fake_clock.now()
    _, notes, record = defaults.decide(cfg, model, train, val)
    assert record.get("skipped") is None, record
    share = defaults.BUDGET_SHARE * record["projected_run_s"]
    step_s = 40 * fast  # one slowed step: the deadline is checked between steps
    assert fake_clock.now() - began <= record["cold_start_s"] + share + step_s
    assert any(defaults.SPENT in note for note in notes.values()), notes


# ------------------------------------------------------------------ GPU candidates, on a CPU


def _gpu_rule(**values):
    from types import SimpleNamespace
    return SimpleNamespace(device=torch.device("cuda"), distributed=None, precision="bf16",
                           channels_last=False, optimizer_impl="fused", **values)


def test_on_a_gpu_fp8_and_the_fused_loss_are_candidates_where_they_can_run(monkeypatch):
    from torch import nn

    from leantrain.techniques import fused_cross_entropy, optimizer, precision
    monkeypatch.setattr(precision, "check", lambda ctx, value: (value != "fp32", "here"))
    monkeypatch.setattr(optimizer, "check", lambda ctx, value: (False, "not here"))
    monkeypatch.setattr(fused_cross_entropy, "check", lambda ctx, value=True: (True, "Liger"))
    wide = nn.Sequential(nn.Linear(16, 4096), nn.Linear(4096, 4096), nn.Linear(4096, 16))
    found = defaults.alternatives(_cfg(), _gpu_rule(), wide)
    assert found == {"fp8": "fp8", "fp8-rowwise": "fp8-rowwise", "fused_cross_entropy": True}
    narrow = nn.Sequential(nn.Linear(16, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 16))
    assert "fp8" not in defaults.alternatives(_cfg(), _gpu_rule(), narrow)  # 0.96x at 1152
    explicit = defaults.alternatives(_cfg("plan.precision=bf16",
                                          "plan.fused_cross_entropy=false"), _gpu_rule(), wide)
    assert explicit == {}


class _InjectedTrials:
    """Trials whose samples/s per round are given (no model is trained)."""

    def __init__(self, rates):
        self.rates = {name: iter(values) for name, values in rates.items()}
        self.window_s = 0.1

    def rate(self, name):
        return next(self.rates[name]), 0.1


def test_of_two_winners_for_one_key_the_faster_is_taken_and_both_are_reported():
    trials = _InjectedTrials({"rule": [100, 101, 99, 100, 100],
                              "precision": [60, 61, 59, 60, 60],
                              "fp8": [130, 128, 131, 129, 130],
                              "fp8-rowwise": [120, 119, 121, 120, 122]})
    flips = {"precision": "fp32", "fp8": "fp8", "fp8-rowwise": "fp8-rowwise"}
    values, notes, results, _ = defaults._measure_flips(trials, flips, _gpu_rule(), 5)
    assert values == {"precision": "fp8"}
    assert notes["precision"].count("measured:") == 3 and "fp32 kept" not in notes["precision"]
    assert "fp32 ran 0.60x as fast as bf16" in notes["precision"]
    assert all(r["chosen"] == "fp8" and r["key"] == "precision" for r in results.values())
    losing = _InjectedTrials({"rule": [100] * 5, "fp8": [96, 95, 97, 96, 96]})
    values, notes, _, _ = defaults._measure_flips(losing, {"fp8": "fp8"}, _gpu_rule(), 5)
    assert values == {"precision": "bf16"} and "fp8 ran 0.96x" in notes["precision"]
