"""The default plan decided by measurement where a rule can lose, and its cache."""

import json
import logging

import pytest
import torch
from conftest import blobs, mlp, tiny_cnn
from torch.utils.data import TensorDataset

from leantrain import fit, load_config
from leantrain.run import defaults


def _images(n=512):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x[:n - 64], y[:n - 64]), TensorDataset(x[n - 64:], y[n - 64:])


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
    summary = fit(tiny_cnn(), *_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = summary["plan"]["outcomes"]["channels_last"]
    assert "rule (not measured:" in outcome and "too short" in outcome
    assert summary["plan_measurement"] is None


def test_the_measured_choices_are_in_the_summary_and_cached_for_the_next_run(measuring, caplog):
    caplog.set_level(logging.INFO, logger="leantrain")
    first = fit(tiny_cnn(), *_images(), _cfg("train.epochs=1"), progress_bar=False)
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
    second = fit(tiny_cnn(), *_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert "measuring" not in caplog.text and "plan cache" in caplog.text
    assert second["plan_measurement"]["from_cache"]
    for name in record["results"]:
        assert second["plan"][name] == first["plan"][name]
        assert "(from the plan cache)" in second["plan"]["outcomes"][name]


def test_the_cache_key_follows_the_model_the_shapes_and_the_settings(measuring):
    cfg, (train, _) = _cfg(), _images()
    key = defaults.cache_key(cfg, tiny_cnn(), train[0], torch.device("cpu"), None)
    assert key == defaults.cache_key(cfg, tiny_cnn(), train[0], torch.device("cpu"), None)
    assert key != defaults.cache_key(cfg, tiny_cnn(classes=5), train[0], torch.device("cpu"),
                                     None)
    assert key != defaults.cache_key(_cfg("data.batch_size=64"), tiny_cnn(), train[0],
                                     torch.device("cpu"), None)
    wider = (torch.randn(1, 16, 16), train[0][1])
    assert key != defaults.cache_key(cfg, tiny_cnn(), wider, torch.device("cpu"), None)


def test_no_cache_measures_again_and_explicit_choices_are_never_measured(measuring):
    fit(tiny_cnn(), *_images(), _cfg("train.epochs=1"), progress_bar=False)
    again = fit(tiny_cnn(), *_images(), _cfg("train.epochs=1", "plan.cache=false"),
                progress_bar=False)
    assert not again["plan_measurement"].get("from_cache")
    explicit = fit(tiny_cnn(), *_images(), _cfg("train.epochs=1", "plan.precision=fp32",
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
    summary = fit(tiny_cnn(), *_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = summary["plan"]["outcomes"]["channels_last"]
    assert "not measured: the run is projected at" in outcome and "over 3% of it" in outcome
    assert json.loads(json.dumps(summary["plan_measurement"]))["look_s"] > 0
