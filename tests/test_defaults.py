"""The default plan decided by measurement where a rule can lose, and its cache."""

import logging
import random

import pytest
import torch
import yaml
from conftest import blobs, mlp, small_images, tiny_cnn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from leantrain import fit, load_config
from leantrain.measure.report import format_summary
from leantrain.run import deciding, defaults, plan_cache


def _cfg(*extra):
    return load_config(None, ["plan.device=cpu", "train.monitor_interval_s=0",
                              "data.batch_size=32", *extra])


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """A run this short is decided on its first steps: the whole run may measure, windows of a
    few steps, the cache in tmp_path."""
    monkeypatch.setattr(deciding, "SHARE", 1.0)
    monkeypatch.setattr(deciding, "WINDOW_S", 0.001)
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_short_run_keeps_the_rules_and_says_so():
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = summary["plan"]["outcomes"]["channels_last"]
    assert "rule (not measured:" in outcome and "too short" in outcome
    assert "which needs 160" in outcome  # (3 candidates: 40 steps, a quarter of the run)
    assert summary["plan_measurement"] is None


def test_the_choices_decided_on_the_first_steps_are_in_the_summary_and_cached(measuring,
                                                                               caplog):
    caplog.set_level(logging.INFO, logger="leantrain")
    first = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=4"), progress_bar=False)
    record = first["plan_measurement"]
    assert record["in_run"] and record["steps"] <= 56
    assert set(record["notes"]) >= {"precision", "channels_last", "optimizer_impl"}
    for name, note in record["notes"].items():
        if name == "compile":
            continue
        assert "measured on the run's first steps" in note or "not measured" in note, note
        assert first["plan"]["outcomes"][name].endswith(note)
        assert first["plan"][name] == record["values"][name]  # the run ended on it
    for result in record["results"].values():
        assert len(result["ratios"]) >= defaults.MIN_ROUNDS
        wins = result["interval"][0] > 1.0
        assert result["chosen"] == (result["tried"] if wins else result["against"])
    assert "decided on the run's first" in caplog.text
    assert len(list(measuring.glob("plans/*.json"))) == 1
    caplog.clear()
    second = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=4"), progress_bar=False)
    assert "decided on the run's first" not in caplog.text and "plan cache" in caplog.text
    assert second["plan_measurement"]["from_cache"]
    for name in ("precision", "channels_last", "optimizer_impl"):
        assert second["plan"][name] == first["plan"][name]
        assert "(from the plan cache)" in second["plan"]["outcomes"][name]


def test_the_cache_key_follows_the_model_the_shapes_and_the_settings(measuring):
    cfg, (train, _) = _cfg(), small_images()
    key = plan_cache.cache_key(cfg, tiny_cnn(), train[0], torch.device("cpu"), None)
    assert key == plan_cache.cache_key(cfg, tiny_cnn(), train[0], torch.device("cpu"), None)
    assert key != plan_cache.cache_key(cfg, tiny_cnn(classes=5), train[0], torch.device("cpu"),
                                       None)
    assert key != plan_cache.cache_key(_cfg("data.batch_size=64"), tiny_cnn(), train[0],
                                       torch.device("cpu"), None)
    wider = (torch.randn(1, 16, 16), train[0][1])
    assert key != plan_cache.cache_key(cfg, tiny_cnn(), wider, torch.device("cpu"), None)


def test_no_cache_measures_again_and_explicit_choices_are_never_measured(measuring):
    fit(tiny_cnn(), *small_images(), _cfg("train.epochs=4"), progress_bar=False)
    again = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=4", "plan.cache=false"),
                progress_bar=False)
    assert again["plan_measurement"]["in_run"] and not again["plan_measurement"].get(
        "from_cache")
    explicit = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=4", "plan.precision=fp32",
                                                "plan.channels_last=true",
                                                "plan.optimizer_impl=foreach",
                                                "plan.compile=false"),
                   progress_bar=False)
    assert explicit["plan_measurement"] is None


# ------------------------------------------------------- decided with injected timings


class _Clocked(torch.nn.Module):
    """An MLP whose forward takes injected time on `clock`: `fp32_s`, or `bf16_s` under bf16
    autocast; with `conv`, a conv net whose forward takes `nhwc_s` on channels_last input."""

    def __init__(self, clock, fp32_s=0.01, bf16_s=0.01, conv=False, nhwc_s=None, jitter=0.0):
        super().__init__()
        self.inner = tiny_cnn() if conv else mlp()
        self.clock, self.fp32_s, self.bf16_s, self.nhwc_s = clock, fp32_s, bf16_s, nhwc_s
        self.jitter, self.noise = jitter, random.Random(0)  # a busy machine's spread

    def forward(self, x):
        seconds = self.bf16_s if torch.is_autocast_enabled("cpu") else self.fp32_s
        if self.nhwc_s is not None and not self.inner[2].weight.is_contiguous():
            seconds = self.nhwc_s  # (its 8 x 8 x 3 x 3 weight is channels_last)
        self.clock.advance(seconds * (1 + self.jitter * self.noise.uniform(-1, 1)))
        return self.inner(x)


@pytest.fixture
def injected(monkeypatch, tmp_path, fake_clock):
    """bf16 is a candidate on any CPU; the optimizer's step takes `kernels[impl]` seconds."""
    from leantrain.techniques import precision
    monkeypatch.setattr(precision, "check", lambda ctx, value: (value in ("fp32", "bf16"),
                                                                "injected"))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))
    kernels = {"fused": 0.0, "foreach": 0.0}

    def step_takes(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        fake_clock.advance(kernels["fused" if group["fused"] else "foreach"])
    handle = register_optimizer_step_pre_hook(step_takes)
    yield fake_clock, kernels
    handle.remove()


def _blobs(n=320):
    x, y = blobs(n)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def _decided(summary, key):
    return summary["plan_measurement"]["notes"][key], summary["plan"][key]


def test_a_faster_candidate_is_taken_mid_run_and_learns_as_the_winner_from_the_start(
        injected):
    clock, _ = injected
    cfg = _cfg("train.epochs=40", "plan.compile=false")  # 320 steps: 80 may measure
    summary = fit(_Clocked(clock, fp32_s=0.01, bf16_s=0.005), *_blobs(), cfg,
                  progress_bar=False)
    note, chosen = _decided(summary, "precision")
    assert chosen == "bf16" and "bf16 ran 2.00x as fast as fp32" in note, note
    assert "taken from step" in note
    taken_at = int(note.split("taken from step ")[1].split()[0].rstrip(";)"))
    assert 20 < taken_at <= 80  # after MIN_ROUNDS rounds, within the quarter of the run
    assert summary["plan_measurement"]["gain_s"] > summary["plan_measurement"]["cost_s"] > 0
    shown = format_summary(summary)  # what `train` prints: the trial's cost beside its gain
    assert "plan decided" in shown and "lost ~" in shown and "gains ~" in shown
    winner = fit(_Clocked(clock), *_blobs(), _cfg("train.epochs=40", "plan.compile=false",
                                                  "plan.precision=bf16",
                                                  "plan.optimizer_impl=" +
                                                  summary["plan"]["optimizer_impl"]),
                 progress_bar=False)
    assert winner["plan_measurement"] is None
    # the learning check's tolerance (tests/test_learning_check.py): +-5% or 0.05
    assert abs(summary["val_loss"] - winner["val_loss"]) <= max(0.05, 0.05 * winner["val_loss"])


def test_a_slower_candidate_is_dropped_and_the_rule_kept(injected):
    clock, kernels = injected
    kernels["foreach"] = 0.02  # foreach steps take 3x as long as fused ones
    summary = fit(_Clocked(clock, bf16_s=0.02), *_blobs(), _cfg("train.epochs=40",
                                                                "plan.compile=false"),
                  progress_bar=False)
    for key, rule, tried in (("precision", "fp32", "bf16"),
                             ("optimizer_impl", "fused", "foreach")):
        note, chosen = _decided(summary, key)
        assert chosen == rule and f"{tried} ran" in note and f"{rule} kept" in note, note
        assert summary["plan_measurement"]["results"][key]["interval"][1] < 1.0


def test_a_candidate_that_cannot_be_told_from_the_rule_leaves_the_rule_within_its_share(
        injected, tmp_path):
    clock, _ = injected
    summary = fit(_Clocked(clock, jitter=0.5), *_blobs(), _cfg("train.epochs=40",
                                                              "plan.compile=false"),
                  tmp_path / "run", progress_bar=False)
    record = summary["plan_measurement"]
    assert record["steps"] <= 80  # a quarter of the run's 320 steps
    for key, rule in (("precision", "fp32"), ("optimizer_impl", "fused")):
        note, chosen = _decided(summary, key)
        assert chosen == rule and "not told from 1 within" in note, note
    # the decided plan is what a resume of this folder continues with
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["plan"]
    assert saved["precision"] == "fp32" and saved["optimizer_impl"] == "fused"


def test_a_tie_keeps_the_rule_without_spending_the_share(injected):
    clock, _ = injected
    summary = fit(_Clocked(clock), *_blobs(), _cfg("train.epochs=40", "plan.compile=false"),
                  progress_bar=False)
    for key, rule in (("precision", "fp32"), ("optimizer_impl", "fused")):
        note, chosen = _decided(summary, key)
        assert chosen == rule and "ran 1.00x" in note and f"{rule} kept" in note, note
    record = summary["plan_measurement"]  # decided after MIN_ROUNDS rounds, not at the share
    # the first step, the sizing, MIN_ROUNDS rounds of 3 windows, and the step that decides
    assert record["steps"] == 1 + deciding.SIZING_STEPS + defaults.MIN_ROUNDS * 3 * (
        record["window_steps"] + 1) + 1 < 80


def test_the_cached_winner_starts_the_next_run_without_measuring(injected, monkeypatch):
    clock, _ = injected
    cfg = _cfg("train.epochs=40", "plan.compile=false")
    fit(_Clocked(clock, bf16_s=0.005), *_blobs(), cfg, progress_bar=False)

    def never(*args, **kwargs):
        raise AssertionError("a cached decision measures nothing")
    monkeypatch.setattr(deciding.PlanTrial, "__init__", never)
    again = fit(_Clocked(clock, bf16_s=0.005), *_blobs(), cfg, progress_bar=False)
    assert again["plan"]["precision"] == "bf16" and again["plan_measurement"]["from_cache"]
    assert "(from the plan cache)" in again["plan"]["outcomes"]["precision"]


def test_kernels_and_layout_switched_mid_run_train_as_the_winning_plan_from_the_start(
        injected):
    """foreach for fused and channels_last off are lossless: the run that switched to them
    ends where the run on them from the first step ends, to float rounding."""
    clock, kernels = injected
    kernels["fused"] = 0.01
    images = small_images()
    cfg = ["train.epochs=12", "plan.compile=false", "plan.precision=fp32"]  # 168 steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(deciding, "SHARE", 1.0)
        switched = fit(_Clocked(clock, conv=True, nhwc_s=0.03), *images, _cfg(*cfg),
                       progress_bar=False)
    assert switched["plan"]["optimizer_impl"] == "foreach"
    assert switched["plan"]["channels_last"] is False
    winner = fit(_Clocked(clock, conv=True), *images,
                 _cfg(*cfg, "plan.optimizer_impl=foreach", "plan.channels_last=false"),
                 progress_bar=False)
    assert switched["val_loss"] == pytest.approx(winner["val_loss"], rel=1e-4)
    assert switched["val_accuracy"] == pytest.approx(winner["val_accuracy"], abs=1e-6)


def test_a_run_that_ends_while_measuring_says_so_and_caches_nothing(injected, tmp_path):
    clock, _ = injected

    class StopAt:
        def __init__(self):
            self.calls = 0

        def evaluated(self, step, metrics):
            pass

        def stop_reason(self):
            self.calls += 1
            return "pruned" if self.calls >= 20 else None

    summary = fit(_Clocked(clock), *_blobs(), _cfg("train.epochs=40", "plan.compile=false"),
                  progress_bar=False, watcher=StopAt())
    note, _ = _decided(summary, "precision")
    assert "not decided: the run ended after 20 steps, while measuring" in note
    assert not list((tmp_path / "cache").glob("plans/*.json"))


def test_a_plan_measured_before_the_run_stops_at_its_share_when_the_machine_slows(
        monkeypatch, tmp_path, fake_clock):
    """What cannot change mid-run (fp8 on a GPU) is measured on copies before the run, held
    to its share of the run: here every CPU candidate is sent there."""
    monkeypatch.setattr(deciding, "can_switch", lambda key, value, rule: False)
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(_LoadArrives, "calls", 0)
    monkeypatch.setattr(_LoadArrives, "clock", fake_clock)
    train, val = small_images()
    cfg = _cfg("train.epochs=1500", "plan.compile=false")  # 14 steps an epoch: long enough
    fast = 0.01
    model = _LoadArrives(fast, slow_after=60)  # the look ran at full speed
    began = fake_clock.now()
    decided = defaults.decide(cfg, model, train, val)
    record, notes = decided.record, decided.notes
    assert record.get("skipped") is None, record
    share = defaults.BUDGET_SHARE * record["projected_run_s"]
    step_s = 40 * fast  # one slowed step: the deadline is checked between steps
    assert fake_clock.now() - began <= record["cold_start_s"] + share + step_s
    assert any(defaults.SPENT in note for note in notes.values()), notes


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


# ------------------------------------------------------------------ GPU candidates, on a CPU


def _gpu_rule(**values):
    from types import SimpleNamespace
    return SimpleNamespace(device=torch.device("cuda"), distributed=None, precision="bf16",
                           channels_last=False, optimizer_impl="fused", optimizer_states="fp32",
                           optimizer_offload=False, fused_cross_entropy=False, **values)


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


def test_on_a_gpu_fp8_is_measured_before_the_run_and_the_switchable_choices_on_it():
    flips = {"precision": "fp32", "optimizer_impl": "foreach", "fp8": "fp8",
             "fp8-rowwise": "fp8-rowwise", "fused_cross_entropy": True}
    in_run, before = defaults.split(flips, _gpu_rule())
    assert in_run == {"precision": "fp32", "optimizer_impl": "foreach"}
    assert before == {"fp8": "fp8", "fp8-rowwise": "fp8-rowwise", "fused_cross_entropy": True}
    fp16 = _gpu_rule()
    fp16.precision = "fp16"  # (a loss scaler from the first step: never switched mid-run)
    assert defaults.split({"precision": "fp32"}, fp16) == ({}, {"precision": "fp32"})


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
