"""plan.compile "auto": compiled only where a probe measured it faster and it pays in the run.

Decisions are tested on injected probe records (no sleeps, no wall-clock assertions); one slow
test probes a real compile end to end.
"""

import pytest
import torch
from conftest import small_images, tiny_cnn

from leantrain import fit, load_config
from leantrain.run import compile_choice, defaults


def _found(median=1.5, interval=(1.3, 1.7), compile_s=10.0, eager_step_s=0.1):
    return {"median": median, "interval": list(interval), "rounds": 5, "compile_s": compile_s,
            "eager_step_s": eager_step_s, "ratios": [median] * 5}


def test_a_probe_is_worth_it_only_on_a_run_the_usual_compile_could_pay_for():
    prior = compile_choice.PRIOR["cpu"]
    needed = compile_choice.MARGIN * prior.compile_s / (1 - 1 / prior.speedup)
    assert compile_choice.worth_probing("cpu", needed * 1.01)[0]
    worth, why = compile_choice.worth_probing("cpu", needed * 0.5)
    assert not worth and "pays on runs over" in why and "projected at" in why
    assert not compile_choice.worth_probing("mps", 1e9)[0]


def test_the_verdict_needs_the_interval_above_one_and_a_run_that_pays():
    take, note = compile_choice.verdict(_found(), steps=1000, sunk=False)
    assert take and "pays after ~300 steps" in note  # 2 x 300 <= 1000
    take, note = compile_choice.verdict(_found(), steps=400, sunk=False)
    assert not take and "compile would pay after ~300 steps" in note and "has 400" in note
    take, note = compile_choice.verdict(_found(), steps=400, sunk=True)  # the probe paid
    assert take and "probe paid the compile" in note
    slower = _found(median=0.93, interval=(0.9, 0.96))
    take, note = compile_choice.verdict(slower, steps=10**9, sunk=True)
    assert not take and "0.93x" in note and "eager kept" in note
    noisy = _found(median=1.2, interval=(0.95, 1.4))
    assert not compile_choice.verdict(noisy, steps=10**9, sunk=True)[0]


def _cfg(*extra):
    return load_config(None, ["plan.device=cpu", "train.monitor_interval_s=0",
                              "data.batch_size=32", "plan.precision=fp32",
                              "plan.channels_last=false", "plan.optimizer_impl=foreach",
                              *extra])


@pytest.fixture
def probing(monkeypatch, tmp_path):
    """Every run is long enough to measure and to probe; the probe's record is injected."""
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setattr(defaults, "BUDGET_SHARE", 1000.0)
    monkeypatch.setattr(defaults, "WINDOW_S", (0.01, 0.01))
    monkeypatch.setattr(compile_choice, "worth_probing", lambda device, run_s: (True, ""))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))
    probes = []

    def inject(found):
        def probe(trials, cfg, rounds, modes=("default",)):
            probes.append(rounds)
            return dict(found)
        monkeypatch.setattr(compile_choice, "probe", probe)
    return inject, probes


def test_a_faster_compile_is_taken_and_the_run_compiles(probing):
    inject, probes = probing
    inject(_found())
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert probes and summary["plan"]["compile"] is True
    assert "measured: compiled steps ran 1.50x" in summary["plan"]["outcomes"]["compile"]
    assert summary["compile"]["seconds"] is not None  # the run really compiled


def test_a_slower_compile_keeps_eager(probing):
    inject, probes = probing
    inject(_found(median=0.9, interval=(0.85, 0.95)))
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert probes and summary["plan"]["compile"] is False
    assert "eager kept" in summary["plan"]["outcomes"]["compile"]


def test_a_run_too_short_to_pay_does_not_compile_and_says_when_it_would(monkeypatch, tmp_path):
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setattr(defaults, "BUDGET_SHARE", 1000.0)
    monkeypatch.setattr(defaults, "WINDOW_S", (0.01, 0.01))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))

    def never(*args):
        raise AssertionError("a run this short must not probe compile")
    monkeypatch.setattr(compile_choice, "probe", never)
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert summary["plan"]["compile"] is False and summary.get("compile") is None
    assert "which pays on runs over" in summary["plan"]["outcomes"]["compile"]


def test_the_next_run_takes_the_cached_measurement_against_its_own_length(probing,
                                                                          monkeypatch):
    inject, probes = probing
    # 2 x (10 s / (0.1 s x (1 - 1/1.5))) = 600 steps to pay; one epoch here is 14 steps
    inject(_found())
    first = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert first["plan"]["compile"] is True and len(probes) == 1

    def never(*args):
        raise AssertionError("the cached decision must not measure again")
    monkeypatch.setattr(defaults, "_measure", never)
    short = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = short["plan"]["outcomes"]["compile"]
    assert short["plan"]["compile"] is False and "compile would pay after ~300 steps" in outcome
    assert "(from the plan cache)" in outcome and short["plan_measurement"]["from_cache"]
    # 50 epochs are 700 steps: the same cache entry now says compile (decided, not trained)
    cfg, notes, record, _ = defaults.decide(_cfg("train.epochs=50"), tiny_cnn(),
                                            *small_images())
    assert cfg.plan.compile is True and record["from_cache"]
    assert "pays after ~300 steps of this run's 700" in notes["compile"]


def test_a_compile_that_fails_in_the_probe_keeps_eager_and_says_why(probing, monkeypatch):
    def broken(trials, cfg, rounds, modes=("default",)):
        raise RuntimeError("Dynamo cannot trace this model")
    monkeypatch.setattr(compile_choice, "probe", broken)
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert summary["plan"]["compile"] is False
    assert "compile failed when probed: RuntimeError: Dynamo cannot trace" in \
        summary["plan"]["outcomes"]["compile"]


@pytest.mark.slow
def test_a_real_probe_measures_the_compiled_step_and_the_run_follows_it(monkeypatch, tmp_path):
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setattr(defaults, "BUDGET_SHARE", 1000.0)
    monkeypatch.setattr(defaults, "WINDOW_S", (0.05, 0.05))
    monkeypatch.setattr(compile_choice, "worth_probing", lambda device, run_s: (True, ""))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=2"), progress_bar=False)
    found = summary["plan_measurement"]["results"]["compile"]
    assert found["rounds"] >= defaults.MIN_ROUNDS and found["compile_s"] >= 0
    assert summary["plan"]["compile"] is found["chosen"]
    assert summary["val_accuracy"] is not None


def test_on_a_gpu_cuda_graphs_are_probed_beside_the_default_mode_and_taken_when_faster(
        probing, monkeypatch):
    from leantrain.techniques import compile_mode
    inject, probes = probing
    monkeypatch.setattr(compile_mode, "check", lambda ctx, mode: (True, "here"))
    gpu, cfg, model = torch.device("cuda"), _cfg(), tiny_cnn()
    assert compile_choice.modes(cfg, model, 1e6, gpu) == ("default", "reduce-overhead")
    assert compile_choice.modes(cfg, model, 1e6, torch.device("cpu")) == ("default",)
    chosen = _cfg("plan.compile_mode=max-autotune")  # a mode the user chose: the only one
    assert compile_choice.modes(chosen, model, 1e6, gpu) == ("max-autotune",)
    # the probe's fastest mode is the run's, and the cache keeps it
    inject({**_found(), "mode": "reduce-overhead"})
    summary = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert summary["plan"]["compile"] is True
    assert "compiled steps (reduce-overhead) ran 1.50x" in summary["plan"]["outcomes"]["compile"]
    assert defaults._compile_mode(summary["plan_measurement"]["results"]["compile"], True) == \
        {"compile_mode": "reduce-overhead"}
    assert defaults._compile_mode({"mode": "reduce-overhead"}, False) == {}


def test_a_cached_plan_without_a_compile_probe_keeps_eager_and_says_how_to_measure_again(
        monkeypatch, tmp_path):
    monkeypatch.setattr(defaults, "MIN_STEPS", 1)
    monkeypatch.setattr(defaults, "BUDGET_SHARE", 1000.0)
    monkeypatch.setattr(defaults, "WINDOW_S", (0.01, 0.01))
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    first = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    assert "which pays on runs over" in first["plan"]["outcomes"]["compile"]
    again = fit(tiny_cnn(), *small_images(), _cfg("train.epochs=1"), progress_bar=False)
    outcome = again["plan"]["outcomes"]["compile"]
    assert again["plan_measurement"]["from_cache"] and again["plan"]["compile"] is False
    assert outcome.count("eager (") == 1 and outcome.count("from the plan cache") == 1
    assert "plan.cache=false measures again" in outcome


def test_a_window_that_recompiled_is_timed_again_and_its_time_is_compile_time(monkeypatch):
    """Padded batches of a new length can recompile long after the warm-up; such a window
    timed the compile (one printed an interval of 0.08-1.16x where the others were 1.13x)."""
    compiled_graphs = [0]
    monkeypatch.setattr(compile_choice, "graphs_compiled", lambda: compiled_graphs[0])

    class FakeRunning:
        """Eager steps of 10 ms, compiled ones of 8 ms; the compiled copy compiles in its first
        window and once more in its third timed window (1 s)."""

        def __init__(self, cfg, trials):
            self.compiled, self.windows = cfg.plan.compile is True, 0

        def window(self, stop):
            self.windows += 1
            if self.compiled and self.windows in (1, 5):
                compiled_graphs[0] += 1
                return 64 * 4, 5.0 if self.windows == 1 else 1.0
            return 64 * 10, 10 * (0.008 if self.compiled else 0.010)

        def close(self):
            pass

    monkeypatch.setattr(compile_choice, "Running", FakeRunning)
    trials = type("T", (), {"window_s": 0.1})()
    found = compile_choice.probe(trials, _cfg(), rounds=5)
    assert found["ratios"] == pytest.approx([1.25] * 5)  # no round timed the recompile
    assert found["interval"] == pytest.approx([1.25, 1.25])
    assert found["recompiled_s"] == 1.0 and found["compile_s"] > 5.0
