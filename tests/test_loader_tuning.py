"""DataLoader settings chosen by measurement, and the device prefetcher."""

import pytest
import torch
from conftest import mlp
from test_measure import SlowItems

from leantrain import fit, load_config
from leantrain.config import DataConfig
from leantrain.data.loaders import DevicePrefetcher, LoaderOptions
from leantrain.data.tuning import (
    MAX_WINDOW_S,
    MIN_WINDOW_S,
    Budget,
    tune_loader,
    usable_cpus,
    worker_counts,
)
from leantrain.techniques.loader import auto_fields, default_options, worth_measuring

ALL_AUTO = {"num_workers", "pin_memory", "prefetch_factor", "persistent_workers"}


def test_worker_counts_are_zero_then_powers_of_two_up_to_the_cpus():
    assert worker_counts(1) == [0, 1]
    assert worker_counts(6) == [0, 1, 2, 4]


def test_tuning_measures_every_candidate_and_returns_one_it_ran():
    consumed = []
    tuning = tune_loader(SlowItems(64, delay=0.002), 8,
                         lambda batch: consumed.append(len(batch[1])),
                         LoaderOptions(), ALL_AUTO, on_cuda=False, epochs=3,
                         window_s=0.15, rounds=1)
    tried = [m.options for m in tuning.measured]
    assert {o.num_workers for o in tried} == set(worker_counts(usable_cpus()))
    assert tuning.choice.num_workers in {o.num_workers for o in tried}
    assert all(m.samples_per_second[0] > 0 and 0 <= m.data_wait[0] <= 1 for m in tuning.measured)
    assert tuning.choice.persistent_workers == (tuning.choice.num_workers > 0)
    assert not tuning.choice.pin_memory  # nothing to pin for on a CPU run
    assert sum(consumed) > 0 and "chose workers=" in tuning.describe()


def test_fixed_values_are_kept_and_only_auto_ones_are_measured():
    values = DataConfig(num_workers=1, pin_memory=False, prefetch_factor="auto",
                        persistent_workers="auto")
    assert auto_fields(values) == {"prefetch_factor", "persistent_workers"}
    base = default_options(values, on_cuda=False, epochs=2)
    assert base == LoaderOptions(1, False, None, True)
    tuning = tune_loader(SlowItems(32, delay=0.001), 8, lambda batch: None, base,
                         auto_fields(values), on_cuda=False, epochs=2, window_s=0.1, rounds=1)
    assert {m.options.num_workers for m in tuning.measured} == {1}
    assert {m.options.prefetch_factor for m in tuning.measured} == {None, 4}


def test_nothing_is_measured_when_the_settings_leave_one_candidate():
    base = LoaderOptions(num_workers=0)
    assert not worth_measuring({"pin_memory", "prefetch_factor"}, base, on_cuda=False)
    assert worth_measuring({"pin_memory"}, base, on_cuda=True)
    assert worth_measuring({"prefetch_factor"}, LoaderOptions(num_workers=2), on_cuda=False)
    assert worth_measuring({"num_workers"}, base, on_cuda=False)


def _short_run():
    cfg = load_config(None, ["plan.device=cpu", "data.batch_size=16", "train.epochs=1",
                             "optim.lr=0.05"])
    return fit(mlp(classes=2), SlowItems(64, delay=0.001), SlowItems(16), cfg, None,
               progress_bar=False)


def test_a_run_too_short_to_pay_for_measuring_keeps_the_defaults_and_says_why():
    tuning = _short_run()["loader_tuning"]
    assert tuning["measured"] == [] and "too short" in tuning["note"]
    assert tuning["choice"].startswith("workers=0")


def test_a_run_with_per_item_work_tunes_its_loader_and_reports_the_choice(monkeypatch):
    from leantrain.data import tuning as tuning_module

    # pretend the run is long enough to pay for measuring, in tiny windows
    monkeypatch.setattr(tuning_module, "MIN_WINDOW_S", 0.0)
    monkeypatch.setattr(tuning_module, "MAX_WINDOW_S", 0.01)
    monkeypatch.setattr(tuning_module, "BUDGET_SHARE", 1000.0)
    summary = _short_run()
    tuning = summary["loader_tuning"]
    assert tuning["choice"] in summary["train_loader"]
    assert len(tuning["measured"]) >= 2 and tuning["note"].startswith("projected run")


def test_the_budget_pays_each_measurements_overhead_before_sizing_windows():
    budget = Budget(10.0, overhead_s=0.1)  # the first look cost 0.1 s beyond its window
    assert budget.window(10) == pytest.approx(0.9)
    budget.spend(1.5, 0.9)  # worker start-up and shutdown: 0.6 s beyond the window, twice
    budget.spend(1.5, 0.9)
    assert budget.left == pytest.approx(7.0)
    assert budget.window(7) == pytest.approx(7.0 / 7 - 0.6)  # the median overhead, learned
    assert budget.affords(7) and not budget.affords(1000)  # 1000 would get under the floor
    assert budget.window(1000) == MIN_WINDOW_S and Budget(1e6, 0.0).window(1) == MAX_WINDOW_S
    assert budget.windows == [0.9, 0.9]


def test_tensor_backed_data_needs_no_tuning(tabular):
    cfg = load_config(None, ["plan.device=cpu", "train.epochs=1"])
    summary = fit(mlp(), *tabular, cfg, None, progress_bar=False)
    assert summary["loader_tuning"] is None and summary["train_loader"] == "in-memory batched"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device prefetcher needs CUDA")
def test_device_prefetcher_yields_the_same_batches_on_the_gpu():
    batches = [(torch.randn(4, 3).pin_memory(), torch.arange(4).pin_memory()) for _ in range(5)]
    out = list(DevicePrefetcher(iter(batches), torch.device("cuda")))
    assert len(out) == 5
    for (x, y), (gx, gy) in zip(batches, out, strict=True):
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
