"""Visibility: step-time breakdown, resource monitor, FLOPs and MFU, measurement probes."""

import json
import logging
import threading
import time

import pytest
import torch
from conftest import mlp
from torch import nn
from torch.utils.data import Dataset

from leantrain import fit, load_config
from leantrain.measure.flops import (
    count_flops,
    cpu_flops_per_cycle,
    device_peak,
    gpu_peak,
    mfu,
)
from leantrain.measure.monitor import ResourceMonitor
from leantrain.measure.probe import untouched
from leantrain.measure.timing import PHASES, StepTimer


def _cfg(*overrides):
    return load_config(None, ["plan.device=cpu", "data.batch_size=32", "train.epochs=2",
                              "optim.lr=0.05", *overrides])


# ------------------------------------------------------------------ step-time breakdown


def test_step_timer_phases_add_up_to_the_wall_time_and_match_known_durations(fake_clock):
    timer = StepTimer(torch.device("cpu"))
    takes = {"data": 0.02, "copy": 0.0, "forward": 0.03, "backward": 0.01, "optimizer": 0.005}
    timer.restart()
    for _ in range(3):
        for phase in PHASES:
            fake_clock.advance(takes[phase])
            timer.mark(phase)
    timer.finish()
    b = timer.breakdown()
    assert b["steps"] == 3
    assert sum(b["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(b["seconds"].values()) == pytest.approx(fake_clock.t, rel=1e-9)
    for phase, seconds in takes.items():
        assert b["seconds"][phase] == pytest.approx(3 * seconds, abs=1e-12)


def test_step_timer_rejects_phases_out_of_order():
    timer = StepTimer(torch.device("cpu"))
    timer.mark("data")
    with pytest.raises(RuntimeError, match="'forward' marked where 'copy' was due"):
        timer.mark("forward")


def test_every_run_reports_a_breakdown_whose_fractions_sum_to_one(tabular, tmp_path):
    summary = fit(mlp(), *tabular, _cfg(), tmp_path / "run", progress_bar=False)
    b = summary["step_breakdown"]
    assert set(b["fractions"]) == set(PHASES)
    assert sum(b["fractions"].values()) == pytest.approx(1.0, abs=0.05)
    assert all(v >= 0 for v in b["seconds"].values())
    assert b["seconds"]["forward"] > 0 and b["seconds"]["backward"] > 0
    assert b["steps"] == summary["steps"] - 1  # the first step (warm-up) is left out
    assert sum(b["seconds"].values()) <= summary["step_seconds"]


class SlowItems(Dataset):
    """Per-item work the loader must wait for: `delay` seconds per sample, slept, or with a
    `clock` (a test's fake clock, main process only) injected, so the model's steps take none."""

    def __init__(self, n: int = 64, delay: float = 0.004, clock=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()
        self.clock, self.delay = clock, delay

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.clock is None:
            time.sleep(self.delay)
        else:
            self.clock.advance(self.delay)
        return self.x[i], self.y[i]


def test_a_run_waiting_on_data_warns_and_names_the_fix(tmp_path, caplog, fake_clock):
    caplog.set_level(logging.WARNING, logger="leantrain")
    summary = fit(mlp(classes=2), SlowItems(clock=fake_clock), SlowItems(16, clock=fake_clock),
                  _cfg("data.num_workers=0", "train.epochs=1"), tmp_path / "run",
                  progress_bar=False)
    b = summary["step_breakdown"]
    assert b["fractions"]["data"] > 0.5
    assert "data.num_workers=0 now" in b["advice"]
    warnings = [r.getMessage() for r in caplog.records if "waiting for data" in r.getMessage()]
    assert len(warnings) == 1 and "data.num_workers" in warnings[0]


# ------------------------------------------------------------------ resource monitor


def test_monitor_thread_starts_samples_and_stops_cleanly():
    monitor = ResourceMonitor(interval_s=0.05, device=torch.device("cpu"))
    before = threading.active_count()
    with monitor:
        assert monitor.running
        x = torch.randn(300, 300)
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:
            x @ x
    assert not monitor.running and threading.active_count() == before
    assert len(monitor.samples) >= 3
    summary = monitor.summary()
    assert summary["rss_bytes"]["max"] > 0
    assert 0 <= summary["cpu_percent"]["mean"] <= 100
    assert len(summary["cpu_percent_per_core_mean"]) == len(monitor.samples[0]
                                                            ["cpu_percent_per_core"])
    assert "no GPU" in summary["gpu"] or torch.cuda.is_available()


def test_monitor_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="interval must be > 0"):
        ResourceMonitor(interval_s=0)


def test_a_run_logs_monitor_samples_and_summarizes_them(tabular, tmp_path):
    summary = fit(mlp(), *tabular, _cfg("train.monitor_interval_s=0.02", "train.epochs=30"),
                  tmp_path / "run", progress_bar=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    samples = [r for r in records if r["kind"] == "monitor"]
    assert samples and all("cpu_percent_per_core" in r and r["rss_bytes"] > 0 for r in samples)
    assert summary["monitor"]["samples"] == len(samples)
    off = fit(mlp(), *tabular, _cfg("train.monitor_interval_s=0"), None, progress_bar=False)
    assert off["monitor"] is None


# ------------------------------------------------------------------ FLOPs and MFU


def test_training_flops_of_an_mlp_match_the_analytic_count():
    b, i, h, o = 16, 8, 32, 3
    model = nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))
    x, y = torch.randn(b, i), torch.randint(0, o, (b,))

    def step():
        nn.functional.cross_entropy(model(x), y).backward()

    forward = 2 * b * (i * h + h * o)
    # backward: the last layer needs grad input and grad weight, the first (its input needs
    # no gradient) only grad weight
    backward = 2 * (2 * b * h * o) + 2 * b * i * h
    assert count_flops(step) == forward + backward


def test_forward_flops_of_a_conv_match_the_analytic_count():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 10, 10)
    with torch.no_grad():
        flops = count_flops(lambda: conv(x))
    assert flops == 2 * 2 * 6 * 10 * 10 * 4 * 3 * 3


def test_a_run_reports_flops_per_sample_and_mfu(tabular):
    summary = fit(mlp(), *tabular, _cfg(), None, progress_bar=False)
    i, h, o = 8, 32, 3
    assert summary["flops_per_sample"] == pytest.approx(2 * (i * h + h * o) + 4 * h * o + 2 * i * h)
    assert summary["achieved_flops_per_second"] == pytest.approx(
        summary["flops_per_sample"] * summary["samples_per_second"])
    assert summary["peak_source"].startswith("estimate")
    assert 0 < summary["mfu"] < 1


def test_mfu_arithmetic():
    # 1 GFLOP per sample at 250 samples/s is 250 GFLOP/s: a quarter of a 1 TFLOP/s peak
    assert mfu(1e9, 250, 1e12) == pytest.approx(0.25)
    h100 = gpu_peak("NVIDIA H100 80GB HBM3", "bf16", tf32=False)
    assert h100.flops_per_second == 989e12 and not h100.estimate
    assert mfu(6 * 100e6 * 2048, 400, h100.flops_per_second) == pytest.approx(
        6 * 100e6 * 2048 * 400 / 989e12)


def test_gpu_peak_table_matches_names_most_specific_first():
    assert gpu_peak("NVIDIA H100 PCIe", "bf16", False).flops_per_second == 756e12
    assert gpu_peak("NVIDIA H200", "fp16", False).flops_per_second == 989e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp32", tf32=True).flops_per_second == 156e12
    assert gpu_peak("NVIDIA L40S", "bf16", False).label.startswith("L40S")
    assert gpu_peak("NVIDIA L4", "bf16", False).label.startswith("L4 ")
    assert gpu_peak("Some Future GPU", "bf16", False) is None


def test_cpu_peak_is_labelled_an_estimate_and_follows_the_simd_width():
    assert cpu_flops_per_cycle({"avx2", "fma"}, "fp32")[0] == 32
    assert cpu_flops_per_cycle({"avx512f"}, "fp32")[0] == 64
    assert cpu_flops_per_cycle({"avx512f", "avx512_bf16"}, "bf16")[0] == 128
    peak, why = device_peak(torch.device("cpu"), "fp32")
    assert peak is not None and peak.estimate and peak.label.startswith("estimate"), why


# ------------------------------------------------------------------ probes


def test_untouched_restores_batchnorm_statistics_gradients_mode_and_rng():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected_draw = torch.rand(1)
    torch.manual_seed(3)
    with untouched(model):
        model.train()
        model(torch.randn(8, 4)).sum().backward()
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.rand(1), expected_draw)


# ------------------------------------------------------------------ load of the machine


def test_the_share_of_the_cores_other_processes_used_comes_from_two_snapshots():
    from leantrain.measure.load import Snapshot, between

    # 10 s on 2 cores: the machine was busy 15 core-seconds, this process 5 of them
    reading = between(Snapshot(0.0, 100.0, 40.0, 2, 2), Snapshot(10.0, 115.0, 45.0, 2, 2))
    assert reading.others_share == pytest.approx(0.5) and reading.busy
    assert "machine BUSY: other processes used 50% of the 2 cores" in reading.describe()
    quiet = between(Snapshot(0.0, 100.0, 40.0, 2, 2), Snapshot(10.0, 106.0, 45.0, 2, 2))
    assert quiet.others_share == pytest.approx(0.05) and not quiet.busy
    assert quiet.to_dict()["busy"] is False
    assert between(Snapshot(1.0, 1, 1, 2, 2), Snapshot(1.0, 1, 1, 2, 2)).others_share == 0.0
    # the same neighbour on 16 cores leaves torch's 8 threads their cores: not busy; with 16
    # threads it oversubscribes them
    on_16 = between(Snapshot(0.0, 0.0, 0.0, 16, 8), Snapshot(10.0, 10.0, 0.0, 16, 8))
    assert not on_16.busy
    assert between(Snapshot(0.0, 0.0, 0.0, 16, 16), Snapshot(10.0, 10.0, 0.0, 16, 16)).busy


def test_a_neighbour_on_a_quarter_of_the_cores_flags_busy_even_with_threads_fitted():
    from leantrain.measure.load import Snapshot, between

    # 2 cores, a neighbour on one of them, torch already down to 1 thread: not oversubscribed,
    # but the machine is shared (caches, memory bandwidth): still busy
    fitted = between(Snapshot(0.0, 0.0, 0.0, 2, 1), Snapshot(10.0, 10.0, 0.0, 2, 1))
    assert not fitted.oversubscribed and fitted.busy
    assert "(1 torch thread)" in fitted.describe()
    crowded = between(Snapshot(0.0, 0.0, 0.0, 2, 2), Snapshot(10.0, 10.0, 0.0, 2, 2))
    assert "2 torch threads on ~1.0 free cores: oversubscribed, set OMP_NUM_THREADS=1" in \
        crowded.describe()


@pytest.mark.parametrize("neighbours, cores, threads, expected", [
    (1.0, 2, 2, 1),  # a hog on one of 2 cores: one thread, on the free core
    (0.05, 2, 2, None),  # quiet: torch's default
    (3.0, 16, 16, 13),
    (2.0, 2, 2, 1),  # nothing free: still one thread
    (1.0, 16, 8, None),  # enough free cores for every thread
])
def test_torch_threads_are_fitted_to_the_cores_others_leave_free(monkeypatch, neighbours,
                                                                 cores, threads, expected):
    from leantrain.measure import load

    readings = iter([load.Snapshot(0.0, 0.0, 0.0, cores, threads),
                     load.Snapshot(1.0, neighbours, 0.0, cores, threads)])
    monkeypatch.setattr(load, "snapshot", lambda: next(readings))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LEANTRAIN_FIT_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        said = load.fit_threads(sample_s=0.0)
        if expected is None:
            assert said is None and torch.get_num_threads() == before
        else:
            assert torch.get_num_threads() == expected
            assert f"torch runs {expected} thread" in said and f"instead of {threads}" in said
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("variable, value", [("OMP_NUM_THREADS", "2"),
                                             ("LEANTRAIN_FIT_THREADS", "0")])
def test_threads_the_user_chose_are_kept(monkeypatch, variable, value):
    from leantrain.measure import load

    monkeypatch.setattr(load, "snapshot", lambda: pytest.fail("no reading is taken"))
    monkeypatch.setenv(variable, value)
    assert load.fit_threads(sample_s=0.0) is None


@pytest.mark.slow
def test_a_cpu_heavy_neighbour_is_seen_as_other_processes_load():
    import os
    import signal
    import subprocess
    import sys
    import time

    from leantrain.measure.load import LoadWatch

    # started through a shell that exits: the spinner is not our child (children's time is
    # ours: a DataLoader's workers work for us), as a neighbour's process would not be
    pid = int(subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' "
                              ">/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                             check=True).stdout)
    try:
        time.sleep(0.5)  # let it start spinning
        with LoadWatch() as watch:
            time.sleep(2.0)  # this process idles: any busy core-time is someone else's
    finally:
        os.kill(pid, signal.SIGKILL)
    # one spinning process: most of one core's worth of time (more on a busier machine)
    assert watch.reading.others_share >= 0.6 / watch.reading.cores


def test_a_paired_speed_up_comes_from_interleaved_rounds_with_an_interval(fake_clock):
    from conftest import Ticking

    from leantrain.measure.latency import paired_speedup, repeated

    fast = Ticking(nn.Linear(4, 2), fake_clock, seconds=0.001)
    slow = Ticking(nn.Linear(4, 2), fake_clock, seconds=0.004)
    found = paired_speedup(fast, slow, repeated(torch.randn(4), 8), rounds=5, repeats=3)
    assert found["ratio"] == pytest.approx(4.0) and found["interval"] == pytest.approx([4, 4])
    assert found["rounds"] == 5 and found["model_ms"] == pytest.approx(1.0)
    assert paired_speedup(fast, slow, repeated(torch.randn(4), 8), rounds=2)["interval"] is None


def test_only_a_command_started_from_the_command_line_fits_threads(monkeypatch, tmp_path):
    """A user's process calling main([...]) (or fit) owns its threads; `leantrain ...` from a
    shell is a process of its own."""
    from leantrain.cli import main
    from leantrain.measure import load

    calls = []
    monkeypatch.setattr(load, "fit_threads", lambda: calls.append(1) or None)
    argv = ["train", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")]
    assert main(argv) == 2 and calls == []
    monkeypatch.setattr("sys.argv", ["leantrain", *argv])
    assert main() == 2 and calls == [1]


class _FakeNvml:
    """pynvml's per-process utilisation samples, as the driver would give them."""

    class NVMLError_NotFound(Exception):  # noqa: N801 (pynvml's name)
        pass

    def __init__(self, samples):
        self.samples, self.asked = samples, []

    def nvmlDeviceGetProcessUtilization(self, handle, since_us):  # noqa: N802
        self.asked.append(since_us)
        if not self.samples:
            raise self.NVMLError_NotFound()
        return self.samples


def _sample(pid, sm, at):
    import types

    return types.SimpleNamespace(pid=pid, smUtil=sm, timeStamp=at)


def test_other_processes_on_the_gpu_in_use_are_read_from_nvml_and_flag_busy(monkeypatch):
    import os

    from leantrain.measure import load

    me = os.getpid()
    nvml = _FakeNvml([_sample(me, 90, 2_000), _sample(4242, 30, 2_000), _sample(4242, 50, 3_000),
                      _sample(777, 20, 900)])  # 777's sample is from before the watch began
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(load, "nvml_handle", lambda index: (nvml, "handle"))
    assert load.gpu_others_percent(1_000) == pytest.approx(40.0)  # 4242's mean; ours left out
    reading = load.LoadReading(0.0, 2, 2, 1.0, load.gpu_others_percent(1_000))
    assert reading.busy and not reading.oversubscribed
    assert "kept the GPU's SMs busy 40% of the time" in reading.describe()
    assert load.LoadReading.from_dict(reading.to_dict()) == reading
    nvml.samples = []  # nobody ran since: NVML says "not found"
    assert load.gpu_others_percent(5_000) == 0.0
    assert not load.LoadReading(0.0, 2, 2, 1.0, 0.0).busy


def test_a_cpu_run_reads_no_gpu_and_never_initialises_cuda(monkeypatch):
    from leantrain.measure import load

    monkeypatch.setattr(load, "nvml_handle", lambda index: pytest.fail("NVML was asked"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert load.gpu_others_percent(0) is None
    with load.LoadWatch() as watch:
        pass
    assert watch.reading.gpu_others_percent is None


def test_a_run_on_a_busy_machine_says_so_in_its_summary(monkeypatch):
    import itertools

    from conftest import blobs, mlp
    from torch.utils.data import TensorDataset

    from leantrain import fit, load_config
    from leantrain.measure import load
    from leantrain.measure.report import format_summary

    ticks = itertools.count()  # every reading: the machine busy on 1 of 2 cores, not by us

    def busy_snapshot():
        t = float(next(ticks))
        return load.Snapshot(t, t, 0.0, 2, 2)

    monkeypatch.setattr(load, "snapshot", busy_snapshot)
    x, y = blobs(120)
    cfg = load_config(None, ["plan.device=cpu", "train.epochs=1", "train.monitor_interval_s=0"])
    summary = fit(mlp(), TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:]), cfg,
                  progress_bar=False)
    assert summary["load"]["busy"] and summary["load"]["others_share"] == pytest.approx(0.5)
    assert "machine BUSY: other processes used 50% of the 2 cores" in format_summary(summary)
    summary["load"] = {**summary["load"], "others_share": 0.0, "busy": False}
    assert "machine BUSY" not in format_summary(summary)


def test_the_thread_fitting_line_waits_for_the_commands_first_log_line():
    """A refusal before any work is the error line alone; a command that works says the
    fitted threads first."""
    import io
    import logging

    from leantrain.commands.common import _SaidFirst

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        held = _SaidFirst("torch runs 1 thread instead of 2")
        assert stream.getvalue() == ""  # nothing said yet: a refusal now prints alone
        logging.getLogger("leantrain.data").warning("data: digits")
        held.remove()
        logging.getLogger("leantrain").warning("later")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["torch runs 1 thread instead of 2",
                                              "data: digits", "later"]


# ---------------------------------------------------------------- deadlines (budgets that hold)


def _spin(seconds_cap: float = 120.0) -> None:
    """Python work that never reaches a step boundary (a compile, a hung first step); the cap
    only bounds a broken test."""
    end = time.monotonic() + seconds_cap
    while time.monotonic() < end:
        pass
    raise AssertionError("the deadline never interrupted the work")


def test_a_deadline_interrupts_work_that_never_checks_it():
    from leantrain.measure import clock, deadline

    with pytest.raises(deadline.BudgetSpent):
        with deadline.until(clock.now() + 0.2):
            _spin()
    assert deadline.current() is None
    time.sleep(0.3)  # no alarm is left behind to fire later


def test_deadlines_nest_the_inner_ends_first_and_the_outer_timer_comes_back():
    from leantrain.measure import clock, deadline

    with pytest.raises(deadline.BudgetSpent):
        with deadline.until(clock.now() + 0.3):
            with deadline.until(clock.now() + 60):  # the outer one ends first
                assert deadline.current() < clock.now() + 1
            _spin()  # the outer block's own timer was re-armed when the inner one left
    with deadline.until(clock.now() + 60), pytest.raises(deadline.BudgetSpent):
        with deadline.until(clock.now() + 0.2):
            _spin()


def test_a_deadline_on_a_fake_clock_ends_at_the_next_check_and_the_timer_waits_for_it(
        fake_clock):
    from leantrain.measure import clock, deadline

    with deadline.until(clock.now() + 10.0):
        fake_clock.advance(9.0)
        deadline.check()  # 1 s left on the (fake) clock
        fake_clock.advance(2.0)
        with pytest.raises(deadline.BudgetSpent):
            deadline.check()


def test_a_deadline_gives_back_someone_elses_timer():
    import signal

    from leantrain.measure import clock, deadline

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with deadline.until(clock.now() + 10):
            pass
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30.0
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert signal.getsignal(signal.SIGALRM) is not deadline._alarm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired
