"""Scale-out: sharded batches, `leantrain launch` (torchrun) with DDP and FSDP2 on CPU/gloo."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import blobs, tiny_cnn, train_here
from test_bench import USER_MODULE as BENCH_MODULE

from leantrain.cli import main
from leantrain.commands.launch import describe_failure, torchrun_args
from leantrain.config import PlanConfig
from leantrain.data.loaders import batch_count, batch_spans
from leantrain.errors import LeantrainError
from leantrain.run.plan import resolve_plan

LEANTRAIN = [sys.executable, "-m", "leantrain"]

# the bench tests' user module (an MLP, a transformer encoder, their data), plus more tokens:
# FSDP's resume test must be able to kill a run in its second epoch
USER_MODULE = BENCH_MODULE + '''
def tokens_large():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (2400, 12), generator=g)
    y = (x == 1).sum(1).clamp(max=3)
    return TensorDataset(x[:2000], y[:2000]), TensorDataset(x[2000:], y[2000:])
'''


# ------------------------------------------------------------------ sharding (fast)


def test_ranks_together_see_exactly_one_process_batches_of_b_times_w():
    n, b, w = 50, 4, 2
    one = [list(range(50))[s] for s in batch_spans(n, b * w, (0, 1))]
    ranks = [[list(range(50))[s] for s in batch_spans(n, b, (r, w))] for r in range(w)]
    assert batch_count(n, b, (0, w)) == 6 == len(ranks[0]) == len(ranks[1])  # 50 // 8
    for i in range(6):
        assert ranks[0][i] + ranks[1][i] == one[i]
    assert len(one) == 7 and len(one[-1]) == 2  # one process keeps its last, short batch


def test_batch_spans_resume_mid_epoch():
    spans = list(batch_spans(40, 4, (1, 2), start=3))
    assert spans[0] == slice(28, 32) and len(spans) == 2


def test_fsdp_plan_keeps_parameters_contiguous_and_sgd_unfused(monkeypatch):
    """FSDP2 shards contiguous parameters only and has no fused-SGD kernel for DTensors: auto
    turns both off (a conv model trained with SGD once failed at fully_shard), explicit asks
    are refused with the reason; fused AdamW stays."""
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    fsdp = PlanConfig(device="cpu", distributed="fsdp")
    plan = resolve_plan(fsdp, tiny_cnn(), optimizer_name="sgd")
    assert not plan.channels_last and plan.optimizer_impl == "foreach"
    assert resolve_plan(fsdp, tiny_cnn(), optimizer_name="adamw").optimizer_impl == "fused"
    ddp = resolve_plan(PlanConfig(device="cpu", distributed="ddp"), tiny_cnn(),
                       optimizer_name="sgd")
    assert ddp.channels_last and ddp.optimizer_impl == "fused"
    with pytest.raises(LeantrainError, match="contiguous"):
        resolve_plan(PlanConfig(device="cpu", distributed="fsdp", channels_last=True),
                     tiny_cnn(), optimizer_name="sgd")
    with pytest.raises(LeantrainError, match="fused SGD"):
        resolve_plan(PlanConfig(device="cpu", distributed="fsdp", optimizer_impl="fused"),
                     tiny_cnn(), optimizer_name="sgd")


def test_launch_arguments_and_their_errors():
    args = torchrun_args(2, 1, 0, None, None, ["train", "--epochs", "1"])
    assert "--standalone" in args and "--max-restarts=0" in args
    assert args[-4:] == ["leantrain.cli", "train", "--epochs", "1"]
    multi = torchrun_args(4, 2, 1, "10.0.0.1", 29500, ["train"])
    assert "--node-rank=1" in multi and "--master-addr=10.0.0.1" in multi
    assert "--standalone" not in multi


def test_elastic_and_restartable_launches_go_through_torchrun():
    restarted = torchrun_args(2, "1", 0, None, None, ["train", "--out", "runs/a"],
                              max_restarts=3)
    assert "--max-restarts=3" in restarted
    assert restarted[-5:] == ["train", "--out", "runs/a", "--resume", "auto"]
    elastic = torchrun_args(2, "1:4", 0, None, None, ["train"], rdzv_endpoint="node0:29400",
                            rdzv_id="job7")
    assert {"--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
            "--rdzv-id=job7"} <= set(elastic)
    assert "--standalone" not in elastic and not any("--node-rank" in a for a in elastic)
    for bad, message in [({"max_restarts": 1}, "--max-restarts needs the train command's --out"),
                         ({"nnodes": "2:1"}, "--nnodes must be M or MIN:MAX"),
                         ({"nnodes": "1:2"}, "needs --rdzv-endpoint"),
                         ({"rdzv_endpoint": "node0"}, "--rdzv-endpoint must be HOST:PORT"),
                         ({"max_restarts": -1}, "--max-restarts must be in 0..100")]:
        values = {"nnodes": "1", "max_restarts": 0, "rdzv_endpoint": None, **bad}
        with pytest.raises(LeantrainError, match=message):
            torchrun_args(2, values["nnodes"], 0, None, None, ["train"],
                          max_restarts=values["max_restarts"],
                          rdzv_endpoint=values["rdzv_endpoint"])


def test_resume_auto_starts_a_run_then_continues_it_from_its_checkpoint(blobs_file, tmp_path,
                                                                       monkeypatch):
    from conftest import snapshot_first_checkpoint

    command = ["train", "--data", str(blobs_file), "--epochs", "2", "--no-progress",
               "--precision", "fp32", "--set", "train.monitor_interval_s=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    snapshot_first_checkpoint(
        monkeypatch, lambda: main([*command, "--out", str(whole), "--resume", "auto"]), killed)
    assert (whole / "summary.json").is_file()  # no checkpoint there: it started the run
    assert not (killed / "summary.json").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*command, "--out", str(killed), "--resume", "auto"]) == 0  # continued
    assert _train_losses(killed) == _train_losses(whole)
    assert main([*command, "--resume", "auto"]) == 2  # (no --out: nothing to continue)


@pytest.mark.parametrize("argv, message", [
    (["launch", "--nproc", "2", "--", "bench"], "launch runs one of: train"),
    (["launch", "--nproc", "0", "--", "train"], "--nproc and --nnodes must be >= 1"),
    (["launch", "--nproc", "2", "--nnodes", "2", "--", "train"], "--master-addr"),
    (["launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--", "train"],
     "--node-rank must be in 0..1"),
    (["launch", "--nproc", "1", "--master-port", "99999", "--", "train"],
     "--master-port must be a TCP port, 1..65535, got 99999"),  # it was ignored on one node
    (["launch", "--nproc", "1", "--master-port", "0", "--", "train"], "--master-port must be"),
])
def test_launch_rejects_bad_input_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_distributed_plan_outside_launch_is_a_clear_error(capsys, tmp_path):
    assert main(["train", "--set", "plan.distributed=fsdp", "--out", str(tmp_path / "r")]) == 2
    assert "needs processes started by `leantrain launch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ real processes (slow)


@pytest.fixture
def blobs_file(tmp_path):
    x, y = blobs(n=512)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


@pytest.fixture
def user_env(tmp_path):
    (tmp_path / "fam.py").write_text(USER_MODULE)
    return dict(os.environ, PYTHONPATH=str(tmp_path))


def _run(cmd: list[str], **kwargs) -> None:
    """Run a command; on failure, show its stderr (each rank's output) in the test report."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]


def _train_losses(run: Path) -> list[float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("batch, accum", [(16, 1), (8, 2)])  # accum: no_sync micro-batches
def test_ddp_on_two_processes_matches_one_process_with_twice_the_batch(blobs_file, tmp_path,
                                                                        batch, accum):
    common = ["--data", str(blobs_file), "--epochs", "1", "--no-progress", "--precision",
              "fp32", "--set", "train.log_every=1", "--set", "train.monitor_interval_s=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(["train", *common, "--set", "data.batch_size=32", "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *common,
          "--set", f"data.batch_size={batch}", "--set", f"plan.grad_accum={accum}",
          "--out", str(two)])
    a, b = _train_losses(one)[:5], _train_losses(two)[:5]
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["plan"]["distributed"] == "ddp"


@pytest.mark.slow
def test_hybrid_sharding_on_four_processes_matches_one_process(blobs_file, tmp_path):
    """plan.parallel.dp_replicate=2 on 4 processes: 2 replicas, each sharded over 2 ranks
    (a 2-D mesh); the same global batch trains as one process does, step for step."""
    common = ["--data", str(blobs_file), "--epochs", "1", "--no-progress", "--precision",
              "fp32", "--set", "train.log_every=1", "--set", "train.monitor_interval_s=0"]
    one, hybrid = tmp_path / "one", tmp_path / "hybrid"
    train_here(["train", *common, "--set", "data.batch_size=32", "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "4", "--", "train", *common, "--set",
          "data.batch_size=8", "--set", "plan.distributed=fsdp", "--set",
          "plan.parallel.dp_replicate=2", "--out", str(hybrid)])
    a, b = _train_losses(one)[:5], _train_losses(hybrid)[:5]
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    plan = json.loads((hybrid / "summary.json").read_text())["plan"]
    assert plan["distributed"] == "fsdp" and plan["replicas"] == 2


@pytest.mark.slow
def test_fsdp2_compiles_each_block_without_graph_breaks_and_trains_as_eager(user_env, tmp_path):
    """Under FSDP2 the repeated blocks are compiled one by one (FSDP2's hooks between their
    graphs): no graph break, and the losses of the eager run."""
    common = [*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--model", "fam:transformer",
              "--data", "fam:tokens", "--epochs", "1", "--no-progress", "--precision", "fp32",
              "--set", "plan.distributed=fsdp", "--set", "data.batch_size=16", "--set",
              "train.log_every=1", "--set", "train.monitor_interval_s=0"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    _run([*common, "--out", str(eager)], env=user_env)
    _run([*common, "--set", "plan.compile=true", "--out", str(compiled)], env=user_env)
    stats = json.loads((compiled / "summary.json").read_text())["compile"]
    assert stats["graphs"] >= 1 and stats["graph_breaks"] == {}
    a, b = _train_losses(eager), _train_losses(compiled)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_the_parallel_layout_must_fit_the_processes_and_fsdp():
    from leantrain.distributed import replica_groups

    assert replica_groups(1, "auto", "ddp", 4) == 1 and replica_groups(2, "auto", "fsdp", 4) == 2
    assert replica_groups(2, 2, "fsdp", 4) == 2 and replica_groups(1, 4, "fsdp", 4) == 1
    for layout, message in [((3, "auto", "fsdp", 4), r"dp_replicate \(3\) x dp_shard \(auto\) "
                                                     "must equal the 4 processes"),
                            ((2, 3, "fsdp", 4), "must equal the 4 processes"),
                            ((2, "auto", "ddp", 4), "plan.distributed=fsdp .this run is ddp"),
                            ((2, "auto", None, 1), "plan.parallel.dp_replicate=1")]:
        with pytest.raises(LeantrainError, match=message):
            replica_groups(*layout)


@pytest.mark.parametrize("sets, fragment", [
    (["plan.parallel.tp=3"], r"plan.parallel.tp \(3\) must divide the 2 processes"),
    (["plan.parallel.pp=2", "plan.parallel.tp=2"], "a multiple of pp x tp \\(4"),
    (["plan.parallel.sp=true"], "plan.parallel.sp splits the stream"),
    (["plan.parallel.dp_replicate=3", "plan.distributed=fsdp"], "must equal the 2 processes"),
])
def test_launch_checks_the_layout_before_it_starts_a_process(tmp_path, sets, fragment):
    """A layout the processes cannot take is one line from the launcher itself, exit 2,
    before any rank starts (each rank said it in a few lines after 10-16 s of start-up)."""
    out = tmp_path / "run"
    done = subprocess.run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train",
                           *[part for s in sets for part in ("--set", s)], "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and re.search(fragment, err[0]), done.stderr
    assert not out.exists()


def _fsdp_args(out: Path) -> list[str]:
    return [*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--model", "fam:transformer",
            "--data", "fam:tokens_large", "--epochs", "2", "--no-progress", "--precision", "fp32",
            "--set", "plan.distributed=fsdp", "--set", "data.batch_size=16",
            "--set", "optim.name=adamw", "--set", "optim.lr=0.003", "--out", str(out)]


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each in its own session)."""
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:  # ended, and reaped
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:  # it ended on its own in the meantime
            pass


@pytest.mark.slow
def test_fsdp2_trains_a_transformer_and_resumes_its_checkpoint(user_env, tmp_path,
                                                              monkeypatch):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run(_fsdp_args(whole), env=user_env)
    reference = json.loads((whole / "summary.json").read_text())
    assert reference["plan"]["distributed"] == "fsdp"
    losses = _train_losses(whole)
    assert losses[-1] < 0.5 * losses[0]  # it learns
    proc = subprocess.Popen(_fsdp_args(killed), env=user_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "latest"  # (sharded) at the end of the first epoch
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    _kill_tree(proc.pid)
    proc.wait()
    assert not (killed / "summary.json").exists()  # killed in the second epoch
    # the run's own model and data functions, named again: a folder alone imports no code
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--resume", str(killed),
          "--model", "fam:transformer", "--data", "fam:tokens_large", "--no-progress"],
         env=user_env)
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["steps"] == reference["steps"]
    assert _train_losses(killed) == losses  # bit-identical to the uninterrupted run
    assert resumed["val_loss"] == reference["val_loss"]
    # model.pt holds full tensors: the final weights load into one plain model
    sys.path.insert(0, str(tmp_path))
    try:
        import fam

        fam.transformer().load_state_dict(torch.load(killed / "model.pt", weights_only=True))
    finally:
        sys.path.remove(str(tmp_path))
    # the same kill resumed on 1 process and on 4 (the global batch kept): it reshards the
    # FSDP2 shards and finishes close to the uninterrupted run
    first = sorted((killed / "checkpoints").glob("step-*"))[0]
    for nproc in (1, 4):
        again = tmp_path / f"on{nproc}"
        _as_killed_at(killed, again, first.name)
        resume = ["train", "--resume", str(again), "--model", "fam:transformer", "--data",
                  "fam:tokens_large", "--no-progress", "--set", f"data.batch_size={32 // nproc}"]
        if nproc == 1:  # (one process runs unsharded: DDP or FSDP2 need several)
            with monkeypatch.context() as here:
                here.syspath_prepend(str(tmp_path))
                train_here([*resume, "--set", "plan.distributed=auto"])
        else:
            _run([*LEANTRAIN, "launch", "--nproc", str(nproc), "--", *resume], env=user_env)
        ended = json.loads((again / "summary.json").read_text())
        assert abs(ended["val_loss"] - reference["val_loss"]) < 1e-3, nproc


def _launch_until_training(blobs_file: Path, out: Path,
                           stderr=subprocess.PIPE) -> subprocess.Popen:
    """A long two-rank launch of train, returned once its first metrics are written."""
    proc = subprocess.Popen([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--data",
                             str(blobs_file), "--epochs", "1000", "--no-progress",
                             "--set", "data.batch_size=8", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_killing_one_rank_ends_the_job_within_60_s_naming_the_rank(blobs_file, tmp_path):
    out = tmp_path / "run"
    proc = _launch_until_training(blobs_file, out)
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = next(w for w in workers if w.environ().get("LOCAL_RANK") == "1")
    killed_at = time.monotonic()
    victim.kill()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 60
    assert proc.returncode != 0
    assert "rank 1 (local rank 1" in err and "failed first" in err and "SIGKILL" in err


def _failure(tmp_path, local_rank: int, exitcode: int, message: str | None = None):
    """torchrun's record of a failed rank, with `message` in its error file when given."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error{local_rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    return ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode,
                          error_file=str(error_file))


def _job_failure(failures):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    return ChildFailedError("leantrain", failures)


def test_a_rank_killed_a_phase_behind_its_peer_is_blamed_for_dying_not_for_hanging(tmp_path):
    """The race the two-rank kill test once lost: the victim was a phase behind when killed
    and its peer failed on the closed connection; it died at work, it did not hang."""
    now = time.time()
    failures = {1: _failure(tmp_path, 1, -9),
                0: _failure(tmp_path, 0, -15, "RuntimeError: Connection closed by peer")}
    heartbeats = {1: {"step": 40, "phase": "forward", "time": now - 0.05},
                  0: {"step": 40, "phase": "backward", "time": now - 0.01}}
    report = describe_failure(_job_failure(failures), heartbeats)
    assert report.startswith("rank 1 (local rank 1, pid 101) failed first, with exit code -9")
    assert "SIGKILL" in report and "stopped making progress" not in report


def test_a_rank_that_hung_until_its_peers_timed_out_is_named_as_stuck(tmp_path):
    now = time.time()
    failures = {1: _failure(tmp_path, 1, -9),
                0: _failure(tmp_path, 0, 1, "DistBackendError: wait timed out after 10 s")}
    heartbeats = {1: {"step": 30, "phase": "forward", "time": now - 15},
                  0: {"step": 30, "phase": "backward", "time": now - 15}}
    report = describe_failure(_job_failure(failures), heartbeats)
    assert report.startswith("rank 1 stopped making progress at step 30 (in its forward phase")


@pytest.mark.slow
def test_a_killed_launcher_takes_its_ranks_with_it(blobs_file, tmp_path):
    """torchrun gives each rank its own session; SIGKILL on the launcher alone must not leave
    them running."""
    out = tmp_path / "run"
    proc = _launch_until_training(blobs_file, out, stderr=subprocess.DEVNULL)
    workers = [w for w in psutil.Process(proc.pid).children(recursive=True)
               if w.environ().get("LOCAL_RANK") is not None]
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    for w in alive:
        w.kill()
    assert not alive, f"ranks still running after their launcher died: {alive}"


def test_the_launch_report_names_the_failed_ranks_own_error(tmp_path):
    result = subprocess.run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--data",
                             str(tmp_path / "missing.npz"), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "exit code 2: data path not found" in result.stderr
    assert "To enable traceback" not in result.stderr  # not torch's boilerplate


@pytest.mark.slow
def test_sigterm_to_launch_checkpoints_every_rank_and_exits_143(blobs_file, tmp_path):
    out = tmp_path / "run"
    proc = _launch_until_training(blobs_file, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    saved = torch.load(latest / "state.pt", weights_only=True)  # (sharded: both ranks wrote)
    assert not saved["progress"]["finished"] and saved["progress"]["step"] > 0
    assert {p.name for p in latest.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}


HANGING_MODULE = """
import os, signal, time
from torch import nn

class Hangs(nn.Module):
    '''Rank 1 stops making progress in its 30th training forward (a stuck kernel, say).'''
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.calls = 0
    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 30 and os.environ.get("RANK") == "1":
                # (it ends at the agent's SIGTERM, not 30 s later at its SIGKILL)
                signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
                time.sleep(3600)
        return self.net(x)

def model():
    return Hangs()
"""


@pytest.mark.slow
def test_a_hung_rank_is_named_not_the_rank_that_timed_out_waiting(blobs_file, tmp_path):
    (tmp_path / "hang.py").write_text(HANGING_MODULE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--data",
                             str(blobs_file), "--model", "hang:model", "--epochs", "50",
                             "--no-progress", "--set", "data.batch_size=8",
                             "--set", "train.dist_timeout_s=4", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 2
    report = result.stderr[result.stderr.index("the job failed"):]
    assert "rank 1 stopped making progress at step" in report, report
    assert "the others failed waiting for it" in report


def test_a_launched_train_without_out_gets_one_run_folder_for_every_rank():
    """Each rank named runs/<its own start time>: two ranks a second apart named two
    folders and the job failed as "not shared" (found on a busy machine)."""
    from leantrain.commands.launch import with_run_folder

    named = with_run_folder(["train", "--epochs", "1"], None)
    assert named[:3] == ["train", "--epochs", "1"] and named[3] == "--out"
    assert named[4].startswith("runs/") and len(named) == 5
    for given in (["train", "--out", "x"], ["train", "--out=x"], ["train", "--resume", "x"],
                  ["bench"]):
        assert with_run_folder(given, 1) == given
    assert with_run_folder(["train"], 2) == ["train"]  # (the shared-folder check asks for --out)


def test_a_stopped_launch_names_the_launch_that_continues_it(monkeypatch):
    from leantrain.commands.launch import _resume_command
    from leantrain.distributed import DistContext
    from leantrain.run.checkpoints import launch_prefix

    # each rank's line: the same ranks again, not a one-process `train --resume`
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch_prefix(DistContext(1, 1, 2, True)) == "launch --nproc 2 -- "
    assert launch_prefix(DistContext(0, 0, 4, True)).startswith("launch --nproc 2 --nnodes 2")
    assert launch_prefix(DistContext()) == ""
    # the launcher's line, from its own arguments and the command's --out
    assert _resume_command(2, 1, 0, None, None, ["train", "--out", "runs/a", "--epochs", "3"]) \
        == "leantrain launch --nproc 2 -- train --resume runs/a"
    assert _resume_command(2, 2, 1, "10.0.0.1", 29500, ["train", "--out=runs/b"]) == \
        ("leantrain launch --nproc 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 "
         "--master-port 29500 -- train --resume runs/b")


# ------------------------------------------------------------------ sharded checkpoints (DCP)


def _two_process_run(blobs_file: Path, out: Path, *extra: str) -> Path:
    """A finished two-rank DDP run of 2 epochs (a checkpoint after each)."""
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--data", str(blobs_file),
          "--epochs", "2", "--no-progress", "--precision", "fp32", "--set",
          "data.batch_size=16", "--set", "train.monitor_interval_s=0", "--out", str(out),
          *extra])
    return out


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    x, y = blobs(n=512)
    data = root / "blobs.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    return data, _two_process_run(data, root / "whole")


def _as_killed(whole: Path, into: Path) -> Path:
    return _as_killed_at(whole, into, sorted((whole / "checkpoints").glob("step-*"))[0].name)


def _as_killed_at(run: Path, into: Path, step: str) -> Path:
    """A copy of `run` as a kill just after checkpoint `step` leaves it."""
    import shutil

    shutil.copytree(run, into)
    for later in sorted((into / "checkpoints").glob("step-*")):
        if later.name > step:
            shutil.rmtree(later)
    (into / "checkpoints" / "latest").write_text(step)
    for name in ("summary.json", "model.pt", "model.pt.sha256", "checkpoint.pt",
                 "checkpoint.pt.sha256"):
        (into / name).unlink(missing_ok=True)
    return into


def test_each_rank_writes_its_own_shards_and_rank_0_the_small_state(sharded_run):
    from leantrain.checkpoint import load_checkpoint

    _, whole = sharded_run
    assert not (whole / "checkpoint.pt").exists()  # no rank gathered the full state
    latest = whole / "checkpoints" / (whole / "checkpoints" / "latest").read_text()
    assert {p.name for p in latest.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    state = load_checkpoint(latest / "state.pt")
    assert "model" not in state and "optimizer" not in state
    assert set(state["shards"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert len(list((whole / "checkpoints").glob("step-*"))) == 2  # train.keep_checkpoints


def _run_model(run: Path) -> torch.nn.Module:
    """The model `train` built for the run (its config, its data's shapes), fresh."""
    from leantrain.commands.common import build_model
    from leantrain.config import load_config
    from leantrain.data import load_data

    cfg = load_config(run / "config.yaml")
    return build_model(cfg, load_data(cfg.data))


def test_a_two_process_checkpoint_loads_into_one_process_exactly(sharded_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from leantrain.run import sharded

    _, whole = sharded_run
    folder = sorted((whole / "checkpoints").glob("step-*"))[0]
    dcp_to_torch_save(folder, tmp_path / "full.pt")  # torch's own consolidation: the reference
    reference = torch.load(tmp_path / "full.pt", weights_only=False)
    model = _run_model(whole)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sharded.load(model, optimizer, folder)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert set(model_state) == set(reference["model"])
    for name, tensor in reference["model"].items():
        assert torch.equal(model_state[name], tensor), name  # difference 0
    for name, states in reference["optimizer"]["state"].items():
        for key, value in states.items():
            assert torch.equal(optimizer_state["state"][name][key], value), (name, key)


def test_a_killed_two_process_run_resumes_on_one_process_and_ends_like_the_whole(
        sharded_run, tmp_path, capsys):
    _, whole = sharded_run
    killed = _as_killed(whole, tmp_path / "killed")
    assert main(["train", "--resume", str(killed), "--no-progress", "--set",
                 "data.batch_size=16"]) == 2  # 1 x 16 is not the run's global batch of 32
    err = capsys.readouterr().err
    assert "global batch changed: 2 x 16 = 32" in err and "data.batch_size=32" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(killed), "--no-progress", "--set",
                 "data.batch_size=32"]) == 0
    ended = json.loads((killed / "summary.json").read_text())
    reference = json.loads((whole / "summary.json").read_text())
    assert ended["steps"] >= reference["steps"]
    assert abs(ended["val_loss"] - reference["val_loss"]) < 1e-3
    assert (killed / "checkpoint.pt").is_file()  # one process writes its single file


def test_a_corrupt_shard_is_refused_in_one_line_naming_it(sharded_run, tmp_path, capsys):
    _, whole = sharded_run
    killed = _as_killed(whole, tmp_path / "killed")
    shard = next((killed / "checkpoints").glob("step-*/__1_0.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["train", "--resume", str(killed), "--no-progress", "--set",
                 "data.batch_size=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "__1_0.distcp is missing or corrupt" in err and len(err.splitlines()) == 1


def test_export_writes_the_model_of_any_sharded_checkpoint_in_one_file(sharded_run, tmp_path,
                                                                      capsys):
    _, whole = sharded_run
    assert main(["export", str(whole), "--out", str(tmp_path / "last.pt")]) == 0
    exported = torch.load(tmp_path / "last.pt", weights_only=True)
    final = torch.load(whole / "model.pt", weights_only=True)
    assert set(exported) == set(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the run's own model.pt
    first = sorted((whole / "checkpoints").glob("step-*"))[0].name
    assert main(["export", str(whole), "--step", str(int(first[5:]))]) == 0
    assert (whole / f"export-{first}.pt").is_file()
    assert main(["export", str(whole), "--step", "999999"]) == 2
    assert "no checkpoint of step 999999" in capsys.readouterr().err


@pytest.mark.slow
def test_a_restartable_launch_survives_a_killed_rank_and_ends_as_if_never_killed(blobs_file,
                                                                                tmp_path):
    common = ["train", "--data", str(blobs_file), "--epochs", "6", "--no-progress",
              "--precision", "fp32", "--set", "data.batch_size=8", "--set",
              "train.monitor_interval_s=0"]
    whole, restarted = tmp_path / "whole", tmp_path / "restarted"
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", *common, "--out", str(whole)])
    proc = subprocess.Popen([*LEANTRAIN, "launch", "--nproc", "2", "--max-restarts", "1", "--",
                             *common, "--out", str(restarted)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    latest = restarted / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists():  # the first epoch's checkpoint, then a kill mid-run
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    victim = next(w for w in psutil.Process(proc.pid).children(recursive=True)
                  if w.environ().get("LOCAL_RANK") == "1")
    victim.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]  # the job finished by itself
    assert "restart 1 of the job" in err
    final, reference = (torch.load(run / "model.pt", weights_only=True)
                        for run in (restarted, whole))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_fsdp2_under_bf16_gathers_bf16_parameters_and_reduces_in_fp32():
    from leantrain.distributed import mixed_precision

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    policy = mixed_precision("bf16", mlp)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision("fp32", mlp) is None and mixed_precision("fp16", mlp) is None
    # BatchNorm's running statistics stay fp32: its model keeps fp32 parameters under autocast
    assert mixed_precision("bf16", torch.nn.Sequential(torch.nn.BatchNorm1d(4))) is None


def test_slurm_and_pytorchjob_nodes_reach_torchrun_never_a_silent_world_of_one(monkeypatch):
    from leantrain.commands.launch import cluster_settings, first_host

    assert first_host("node[03-05,9],gpu1") == "node03" and first_host("gpu7,gpu8") == "gpu7"
    where, found = cluster_settings({"SLURM_JOB_ID": "812", "SLURM_NNODES": "2",
                                     "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]"})
    assert where == "SLURM job 812"
    assert found == {"nnodes": "2", "node_rank": "1", "master_addr": "gpu12",
                     "master_port": "29500", "rdzv_id": "812"}
    where, found = cluster_settings({"PET_NNODES": "2", "PET_NODE_RANK": "0",
                                     "PET_MASTER_ADDR": "job-master-0", "PET_MASTER_PORT": "23456"})
    assert found == {"nnodes": "2", "node_rank": "0", "master_addr": "job-master-0",
                     "master_port": "23456"}
    # what launch passes torchrun there: two nodes, never --standalone
    args = torchrun_args(2, found["nnodes"], int(found["node_rank"]), found["master_addr"],
                         int(found["master_port"]), ["train"])
    assert "--nnodes=2" in args and "--standalone" not in args
    assert "--master-addr=job-master-0" in args
    assert cluster_settings({"HOME": "/root"}) == ("", {})


@pytest.mark.parametrize("env, message", [
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, "task 1 of 2 that srun started"),
    ({"PET_NNODES": "2"}, "PyTorchJob of 2 nodes"),
])
def test_tasks_a_cluster_started_without_torchrun_are_refused(env, message, monkeypatch,
                                                              tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_run_folder_a_rank_cannot_see_is_named_before_training(tmp_path, monkeypatch):
    from leantrain import distributed
    from leantrain.distributed import DistContext
    from leantrain.run import folder

    def node_1_elsewhere(value, ctx):  # rank 1's view of the folder: another machine's disk
        if isinstance(value[0], bool):
            return [value, (False, "node1", str(tmp_path))]
        return [value, (None, value[1])]

    monkeypatch.setattr(distributed, "gather_objects", node_1_elsewhere)
    with pytest.raises(LeantrainError, match="rank 1 on node1 cannot see"):
        folder.check_shared(tmp_path, DistContext(0, 0, 2, True))
    assert not list(tmp_path.glob(".shared-*"))  # the probe is gone either way
    monkeypatch.setattr(distributed, "gather_objects", lambda value, ctx: [value, value])
    folder.check_shared(tmp_path, DistContext(0, 0, 2, True))  # both see it: no word


def test_two_nodes_given_folders_that_are_not_one_are_stopped_in_one_line(blobs_file,
                                                                          tmp_path):
    """Two launchers on this machine as 2 nodes, each given its own --out (as two machines'
    local disks would be): every checkpoint would be split between them. Both stop before
    training, naming the rank that cannot see rank 0's folder."""
    port = _free_port()
    train = ["--data", str(blobs_file), "--epochs", "1", "--no-progress"]
    nodes = [_node(rank, port, [*train, "--out", str(tmp_path / f"node{rank}")])
             for rank in (0, 1)]
    try:
        errors = [n.communicate(timeout=120)[1] for n in nodes]
        assert all(n.returncode != 0 for n in nodes)
        for err in errors:
            assert "is not shared: rank 1 on" in err and "its run folder:" in err, err[-2000:]
        assert not (tmp_path / "node0" / "metrics.jsonl").exists()  # before training
    finally:
        for n in nodes:
            _kill_tree(n.pid)
            n.wait()


def test_a_second_save_at_the_same_step_never_replaces_the_checkpoint_latest_names(tmp_path):
    """A kill between removing a folder and renaming its successor once could leave `latest`
    naming nothing: a save at a step that has a checkpoint gets a new name, and the older one
    goes only after `latest` names the new."""
    import torch.distributed as dist

    from leantrain.distributed import DistContext
    from leantrain.run import sharded

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out, ctx = tmp_path / "run", DistContext(0, 0, 1, True)
        for step in (3, 5, 5, 7):
            sharded.save(model, optimizer, {"step": step}, out, ctx, step)
            assert (sharded.latest(out) / sharded.STATE).is_file()
        kept = sorted(p.name for p in (out / sharded.FOLDER).glob("step-*"))
        assert kept == ["step-00000005-1", "step-00000007"]  # the last 2 steps, newest state
        assert sharded.latest(out).name == "step-00000007"
        for step in (8, 9):  # train.keep_checkpoints=3
            sharded.save(model, optimizer, {"step": step}, out, ctx, step, keep=3)
        kept = sorted(p.name for p in (out / sharded.FOLDER).glob("step-*"))
        assert kept == ["step-00000007", "step-00000008", "step-00000009"]
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:  # a free port for node 0's store
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:  # gone (a short-lived helper process)
        return {}


def _node(node_rank: int, port: int, train: list[str]) -> subprocess.Popen:
    """One node's launcher of a 2-node job on this machine (one process per node)."""
    return subprocess.Popen([*LEANTRAIN, "launch", "--nproc", "1", "--nnodes", "2",
                             "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                             "--master-port", str(port), "--", "train", *train],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_node_waiting_for_a_missing_node_says_so(tmp_path, monkeypatch):
    port = _free_port()
    proc = _node(0, port, ["--out", str(tmp_path / "run")])
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "waiting at" not in line:  # node 1 never comes
            assert time.monotonic() < deadline and proc.poll() is None
            line = proc.stderr.readline()
        assert f"waiting at 127.0.0.1:{port} for the job's 2 nodes: 1 arrived (this is node 0)" \
            in line
    finally:
        _kill_tree(proc.pid)
        proc.wait()


def test_two_nodes_both_name_the_rank_killed_on_one_of_them(blobs_file, tmp_path):
    """Two launchers on this machine as the 2 nodes of a job: a rank SIGKILLed on node 1 ends
    both within 30 s, and node 0, whose own rank only saw a closed connection, names the
    killed rank too (from node 1's report in the shared run folder), not its own."""
    port, out = _free_port(), tmp_path / "run"
    train = ["--data", str(blobs_file), "--epochs", "1000", "--no-progress", "--set",
             "data.batch_size=8", "--out", str(out)]
    nodes = [_node(rank, port, train) for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.05)
        victim = next(w for w in psutil.Process(nodes[1].pid).children(recursive=True)
                      if _environ(w).get("RANK") == "1")
        killed_at = time.monotonic()
        victim.kill()
        errors = [n.communicate(timeout=30)[1] for n in nodes]
        assert time.monotonic() - killed_at < 30
        assert all(n.returncode != 0 for n in nodes)
        for err in errors:
            first = next(line for line in err.splitlines() if "failed first" in line)
            assert "rank 1 (" in first and f"pid {victim.pid}) failed first" in first, first
            assert "SIGKILL" in first
        assert "rank 1 (on " in errors[0]  # node 0 names the rank another node ran
    finally:
        for n in nodes:
            _kill_tree(n.pid)
            n.wait()


def test_checkpoints_written_in_the_background_change_nothing_the_run_computes(sharded_run):
    from leantrain.checkpoint import load_checkpoint

    data, whole = sharded_run
    background = _two_process_run(data, whole.parent / "background", "--set",
                                  "train.async_checkpoint=true")
    final, reference = (torch.load(run / "model.pt", weights_only=True)
                        for run in (background, whole))
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    folders = sorted((background / "checkpoints").glob("step-*"))
    assert [f.name for f in folders] == \
        [f.name for f in sorted((whole / "checkpoints").glob("step-*"))]
    for folder in folders:  # each committed: its state, and every shard's hash
        state = load_checkpoint(folder / "state.pt")
        assert set(state["shards"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    assert not list((background / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_a_job_sigkilled_while_a_background_save_is_uncommitted_resumes_exactly(sharded_run,
                                                                              tmp_path):
    """A checkpoint at every step, written in the background: the job is SIGKILLed (every
    process) while a save is written but not committed; the previous checkpoint is the
    latest, and the resume ends with the uninterrupted run's losses and weights."""
    data, whole = sharded_run
    out = tmp_path / "killed"
    proc = subprocess.Popen([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--data",
                             str(data), "--epochs", "2", "--no-progress", "--precision", "fp32",
                             "--set", "data.batch_size=16", "--set", "train.monitor_interval_s=0",
                             "--set", "train.async_checkpoint=true", "--set",
                             "train.checkpoint_every=1", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, deadline = out / "checkpoints", time.monotonic() + 120
    while not ((root / "latest").exists() and list(root.glob(".step-*.tmp"))
               and len(list(root.glob("step-*"))) >= 2):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.001)
    _kill_tree(proc.pid)
    proc.wait()
    assert not (out / "summary.json").exists()
    latest = root / (root / "latest").read_text()
    assert (latest / "state.pt").is_file()  # the committed one, never the one being written
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", "--resume", str(out),
          "--no-progress"])
    assert _train_losses(out) == _train_losses(whole)
    final, reference = (torch.load(run / "model.pt", weights_only=True) for run in (out, whole))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_background_save_killed_before_its_commit_leaves_the_previous_one_latest(tmp_path):
    """Whatever instant a kill comes before `commit()` (the shards half-written or all), the
    previous checkpoint is the one `latest` names, and it loads exactly."""
    import torch.distributed as dist

    from leantrain.distributed import DistContext
    from leantrain.run import sharded

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out, ctx = tmp_path / "run", DistContext(0, 0, 1, True)
        sharded.save(model, optimizer, {}, out, ctx, 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
        pending = sharded.save(model, optimizer, {}, out, ctx, 5, asynchronous=True)
        pending.future.result()  # (written, never committed: the process dies here)
        assert sharded.latest(out).name == "step-00000003"
        assert list((out / sharded.FOLDER).glob(".step-00000005.tmp"))
        restored = torch.nn.Linear(3, 2)
        sharded.load(restored, torch.optim.SGD(restored.parameters(), lr=0.1),
                     sharded.latest(out))
        assert all(torch.equal(restored.state_dict()[k], before[k]) for k in before)
        assert pending.commit().name == "step-00000005"  # (alive after all: it commits)
        assert sharded.latest(out).name == "step-00000005"
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ tensor parallel


def test_the_tensor_parallel_plan_is_the_models_own_and_checked_for_tp():
    import shapes

    from leantrain.tensor_parallel import layer_plan

    plan = layer_plan(shapes.llama_gqa(), 2)
    assert plan["model.layers.0.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.1.self_attn.o_proj"] == "rowwise"
    assert plan["model.layers.1.mlp.down_proj"] == "rowwise"
    assert plan["lm_head"] == "colwise_gather_output"  # logits gathered for the loss
    assert plan["model.embed_tokens"] == "embedding_rowwise"
    assert len(plan) == 16  # 7 projections in each of 2 blocks, the embedding and the head
    from leantrain.tensor_parallel import split_share

    model = shapes.llama_gqa()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    total = sum(p.numel() for p in model.parameters())
    assert split_share(model, 2) == pytest.approx(1 - norms / total)  # all but the norms
    with pytest.raises(LeantrainError, match="4 attention heads and 2 key/value heads "
                                             r"\(grouped-query\) must divide by tp"):
        layer_plan(shapes.llama_gqa(), 4)
    with pytest.raises(LeantrainError, match="Sequential declares no tensor-parallel plan"):
        layer_plan(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        tie_word_embeddings=True))
    assert "lm_head" not in layer_plan(tied, 2)  # a tied head and embedding stay one tensor
    assert "model.embed_tokens" not in layer_plan(tied, 2)


def test_tokens_per_step_counts_a_tensor_parallel_group_once():
    """Both ranks of a tp=2 group see one batch: 512 tokens a step from micro-batches of 128
    is 4 of them, as on one process (it was 2: half the tokens asked for)."""
    import shapes

    from leantrain.config import config_from_dict
    from leantrain.distributed import DistContext
    from leantrain.run.plan import resolve_plan

    cfg = config_from_dict({"plan": {"tokens_per_step": 512, "device": "cpu",
                                     "parallel": {"tp": 2}}})
    plan = resolve_plan(cfg.plan, shapes.llama_gqa(), 128, "adamw", DistContext(0, 0, 2, True))
    assert plan.grad_accum == 4 and plan.tp == 2 and plan.distributed == "fsdp"


def test_tensor_parallel_outside_launch_or_under_ddp_is_one_line(tmp_path, capsys):
    from leantrain.cli import main

    code = main(["train", "--no-progress", "--set", "plan.parallel.tp=2", "--out",
                 str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan.parallel.tp=2 splits layers across processes" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tensor_parallel_on_a_stock_llama_with_grouped_query_attention_matches_one_process(
        tmp_path):
    """tp=2 on 2 processes: both see every batch, each holds half of every split projection
    (the shards its checkpoint holds), the losses of 20 steps equal one process's (gradient
    clipping at every step), and its checkpoint resumes on one process."""
    from torch.distributed.checkpoint import FileSystemReader

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    common = ["--model", "shapes:llama_gqa", "--data", "shapes:lm_data", "--epochs", "1",
              "--no-progress", "--precision", "fp32", "--set", "train.log_every=1", "--set",
              "train.monitor_interval_s=0", "--set", "train.max_steps=20", "--set",
              "data.batch_size=8", "--set", "train.clip_norm=0.05"]  # (clipping every step)
    one, split = tmp_path / "one", tmp_path / "tp"
    train_here(["train", *common, "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *common, "--set",
          "plan.parallel.tp=2", "--set", "train.checkpoint_every=10", "--out", str(split)],
         env=env)
    a, b = _train_losses(one), _train_losses(split)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    # its checkpoint at step 10 resumes on one process (tp 2 -> 1: DCP joins the halves)
    alone = _as_killed_at(split, tmp_path / "alone", "step-00000010")
    shutil.rmtree(alone / "pretrained")
    train_here(["train", "--resume", str(alone), "--model", "shapes:llama_gqa", "--data",
                "shapes:lm_data", "--no-progress", "--set", "plan.parallel.tp=1", "--set",
                "plan.distributed=auto"])
    c = _train_losses(alone)
    assert len(c) == 20 and max(abs(x - y) for x, y in zip(b, c, strict=True)) < 1e-5
    plan = json.loads((split / "summary.json").read_text())["plan"]
    assert plan["tp"] == 2 and plan["distributed"] == "fsdp"
    latest = split / "checkpoints" / (split / "checkpoints" / "latest").read_text()
    tensors = FileSystemReader(str(latest)).read_metadata().state_dict_metadata
    for name, local in [("model.model.layers.0.self_attn.q_proj.weight", [16, 32]),
                        ("model.model.layers.0.self_attn.k_proj.weight", [8, 32]),
                        ("model.model.layers.0.self_attn.o_proj.weight", [32, 16]),
                        ("model.model.layers.1.mlp.down_proj.weight", [32, 32])]:
        assert [list(c.sizes) for c in tensors[name].chunks] == [local, local], name
    import shapes  # model.pt: the whole weights, for the plain model

    shapes.llama_gqa().load_state_dict(torch.load(split / "model.pt", weights_only=True))


@pytest.mark.slow
def test_fsdp2_by_tensor_parallel_on_4_processes_matches_one_and_resumes_a_fsdp2_run(tmp_path):
    """A 2 x 2 mesh (FSDP2 over 2 data-parallel ranks, each layer split over 2): the same
    global batch trains as one process does; a checkpoint of a 2-rank FSDP2 run resumes into
    that layout (DCP reshards it) and continues as the FSDP2 run did."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    common = ["--model", "shapes:llama_gqa", "--data", "shapes:lm_data", "--epochs", "1",
              "--no-progress", "--precision", "fp32", "--set", "train.log_every=1", "--set",
              "train.monitor_interval_s=0", "--set", "train.max_steps=10"]
    one, mesh, sharded = tmp_path / "one", tmp_path / "mesh", tmp_path / "fsdp"
    train_here(["train", *common, "--set", "data.batch_size=8", "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "4", "--", "train", *common, "--set",
          "data.batch_size=4", "--set", "plan.parallel.tp=2", "--out", str(mesh)], env=env)
    a, b = _train_losses(one), _train_losses(mesh)
    assert len(a) == len(b) == 10  # (4.1e-7 at most on a 2-core AMD EPYC)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *common, "--set",
          "data.batch_size=4", "--set", "plan.distributed=fsdp", "--set",
          "train.checkpoint_every=5", "--out", str(sharded)], env=env)
    resumed = _as_killed_at(sharded, tmp_path / "resumed", "step-00000005")
    _run([*LEANTRAIN, "launch", "--nproc", "4", "--", "train", "--resume", str(resumed),
          "--model", "shapes:llama_gqa", "--data", "shapes:lm_data", "--no-progress",
          "--set", "plan.parallel.tp=2"], env=env)
    c, d = _train_losses(sharded), _train_losses(resumed)
    assert len(c) == len(d) == 10 and c[:5] == d[:5]
    assert max(abs(x - y) for x, y in zip(c, d, strict=True)) < 1e-6  # (4.1e-7 measured)


def _one_process_then_tp2(tmp_path: Path, module: str, text: str, model: str, data: str,
                          steps: int, *extra: str) -> tuple[Path, list[float], list[float]]:
    """The user module `text` as `module`, its model trained `steps` steps on one process and
    on 2 with tp=2 (`extra` settings on the latter): (the tp run's folder, the one
    process's losses, the tp run's)."""
    (tmp_path / f"{module}.py").write_text(text)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    common = ["--model", model, "--data", data, "--epochs", "1", "--no-progress",
              "--precision", "fp32", "--set", "train.log_every=1", "--set",
              "train.monitor_interval_s=0", "--set", f"train.max_steps={steps}", "--set",
              "data.batch_size=8"]
    one, split = tmp_path / "one", tmp_path / "tp"
    _train_here_with(tmp_path, module, ["train", *common, "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *common, "--set",
          "plan.parallel.tp=2", *extra, "--out", str(split)], env=env)
    return split, _train_losses(one), _train_losses(split)


def _train_here_with(folder: Path, module: str, argv: list[str]) -> None:
    """train_here with the user module `module` of `folder` (none of that name cached)."""
    sys.path.insert(0, str(folder))
    sys.modules.pop(module, None)
    try:
        train_here(argv)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(module, None)


BERT_MODULE = '''
import torch
from leantrain.data.loaders import TensorDictDataset

def bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))

def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 48, (160, 12), generator=g)
    labels = (ids == 1).sum(1).clamp(max=2)
    def part(s):
        return TensorDictDataset(input_ids=ids[s], attention_mask=torch.ones_like(ids[s]),
                                 labels=labels[s])
    return part(slice(0, 128)), part(slice(128, 160))
'''


@pytest.mark.slow
def test_a_bert_style_encoder_is_split_by_a_plan_derived_from_its_structure(tmp_path):
    """BERT declares no tensor-parallel plan; its structure gives one (q, k, v and the MLP's
    first layer by columns, the attention's and the MLP's output by rows): tp=2 trains as one
    process does."""
    split, a, b = _one_process_then_tp2(tmp_path, "enc", BERT_MODULE, "enc:bert", "enc:data",
                                        8)
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    outcome = json.loads((split / "summary.json").read_text())["plan"]["outcomes"]
    assert "(12 layers split)" in outcome["distributed"]


TP_HOOK = '''
import torch
from torch.utils.data import TensorDataset
from leantrain.recipes.gpt import GPT

def gpt():
    return GPT(vocab=48, context=15, depth=2, width=32, heads=4)

def tokens():
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 48, (320, 1), generator=g) + torch.arange(16)) % 48
    x, y = ids[:, :-1], ids[:, 1:]
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
'''


def test_a_users_own_tensor_parallel_plan_is_called_with_the_model_and_the_mesh(tmp_path,
                                                                                monkeypatch):
    """plan.parallel.tp_plan=module:fn: leantrain imports the user's function and calls it
    with the model and the tp mesh in place of a plan of its own (its training on 2
    processes equal to one process's was a slow test of an earlier session, within 1e-5)."""
    from leantrain import tensor_parallel

    (tmp_path / "hooked.py").write_text("seen = []\n\ndef split(model, mesh):\n"
                                        "    seen.append((model, mesh))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, mesh = torch.nn.Linear(2, 2), object()
    tensor_parallel.apply(model, mesh, {}, "hooked:split")
    import hooked

    assert hooked.seen == [(model, mesh)]


def test_fused_attention_gets_a_plan_from_its_layout():
    """GPT-2 (Conv1D) and the text-gpt recipe fuse q, k and v: the projection is split in its
    three parts, the output and the MLP as Megatron does; heads must divide by tp."""
    import shapes

    from leantrain.recipes.gpt import GPT
    from leantrain.tensor_parallel import layer_plan

    plan = layer_plan(shapes.gpt2_deep(), 2)
    assert {k: v for k, v in plan.items() if k.startswith("transformer.h.0.")} == {
        "transformer.h.0.attn.c_attn": "colwise_fused", "transformer.h.0.attn.c_proj": "rowwise",
        "transformer.h.0.mlp.c_fc": "colwise", "transformer.h.0.mlp.c_proj": "rowwise"}
    assert len(plan) == 16  # the tied head and embedding stay whole
    assert layer_plan(GPT(vocab=48, context=15, depth=2, width=32, heads=4), 2) == {
        "blocks.0.attention.qkv": "colwise_fused", "blocks.0.attention.proj": "rowwise",
        "blocks.0.mlp.0": "colwise", "blocks.0.mlp.2": "rowwise",
        "blocks.1.attention.qkv": "colwise_fused", "blocks.1.attention.proj": "rowwise",
        "blocks.1.mlp.0": "colwise", "blocks.1.mlp.2": "rowwise"}
    with pytest.raises(LeantrainError, match="blocks.0.attention's 3 attention heads must "
                                             "divide by tp"):
        layer_plan(GPT(vocab=48, context=15, depth=2, width=30, heads=3), 2)
    from leantrain.config import config_from_dict
    from leantrain.distributed import DistContext
    from leantrain.run.plan import resolve_plan

    cfg = config_from_dict({"plan": {"device": "cpu", "parallel": {"tp": 2}}})
    with pytest.raises(LeantrainError, match="blocks.0.attention.qkv holds q, k and v in one "
                                             "projection.*over 2 data-parallel ranks"):
        resolve_plan(cfg.plan, GPT(vocab=48, context=15, depth=2, width=32, heads=4), 15,
                     "adamw", DistContext(0, 0, 4, True))


FUSED_MODULE = TP_HOOK + '''
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))

def lm():
    from leantrain.data.loaders import TensorDictDataset
    train, val = tokens()
    def part(d):
        ids = torch.cat([d.tensors[0], d.tensors[1][:, -1:]], 1)
        return TensorDictDataset(input_ids=ids, labels=ids)
    return part(train), part(val)

def gpt_val_loss(state):
    model = gpt()
    model.load_state_dict(state)
    x, y = tokens()[1].tensors
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()

def gpt2_val_loss(state):
    model = gpt2()
    model.load_state_dict(state, strict=False)  # (the tied head: one tensor saved)
    ids = lm()[1].tensors["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()
'''


def _model_pt_scores_the_runs_val_loss(tmp_path: Path, split: Path, score: str) -> None:
    """model.pt of a tp run is the whole model in its own order: loaded into the plain model
    (the user module's `score(state)`), its validation loss is the run's last one."""
    import importlib
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("mine")
        loss = getattr(module, score)(torch.load(split / "model.pt", weights_only=True))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mine", None)
    records = [json.loads(r) for r in (split / "metrics.jsonl").read_text().splitlines()]
    assert abs(loss - [r for r in records if "val_loss" in r][-1]["val_loss"]) < 1e-5


@pytest.mark.slow
def test_the_text_gpt_recipe_splits_its_fused_attention_and_resumes_on_one_process(tmp_path):
    """tp=2 on the text-gpt recipe's GPT with no plan of the user's: 20 steps equal one
    process's, each rank holds half of q, of k and of v, the whole weights come back in the
    model's order, and the step-10 checkpoint resumes on one process (tp 2 -> 1)."""
    from torch.distributed.checkpoint import FileSystemReader

    split, a, b = _one_process_then_tp2(tmp_path, "mine", FUSED_MODULE, "mine:gpt",
                                        "mine:tokens", 20, "--set", "train.checkpoint_every=10")
    assert len(a) == len(b) == 20 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    _model_pt_scores_the_runs_val_loss(tmp_path, split, "gpt_val_loss")
    step10 = split / "checkpoints" / "step-00000010"
    tensors = FileSystemReader(str(step10)).read_metadata().state_dict_metadata
    qkv = tensors["model.blocks.0.attention.qkv.weight"]
    assert sorted(list(c.sizes) for c in qkv.chunks) == [[48, 32], [48, 32]]
    alone = _as_killed_at(split, tmp_path / "alone", "step-00000010")
    shutil.rmtree(alone / "pretrained", ignore_errors=True)
    _train_here_with(tmp_path, "mine", [
        "train", "--resume", str(alone), "--model", "mine:gpt", "--data", "mine:tokens",
        "--no-progress", "--set", "plan.parallel.tp=1", "--set", "plan.distributed=auto"])
    c = _train_losses(alone)
    assert len(c) == 20 and max(abs(x - y) for x, y in zip(b, c, strict=True)) < 1e-5


@pytest.mark.slow
def test_a_stock_gpt2_splits_its_conv1d_attention_and_mlp(tmp_path):
    """GPT-2's fused c_attn and its MLP are Conv1D layers (weights stored (in, out)): tp=2
    trains as one process does and model.pt holds the whole weights in GPT-2's layout."""
    split, a, b = _one_process_then_tp2(tmp_path, "mine", FUSED_MODULE, "mine:gpt2", "mine:lm",
                                        8)
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    _model_pt_scores_the_runs_val_loss(tmp_path, split, "gpt2_val_loss")
    outcome = json.loads((split / "summary.json").read_text())["plan"]["outcomes"]
    assert "(8 layers split)" in outcome["distributed"]


def test_a_tensor_parallel_group_s_flops_are_shared_by_its_devices():
    """A tp=2 group's samples are computed by both its devices: each achieves half the
    FLOP/s (its MFU was reported twice too high), as do the stages of a pipeline."""
    import types

    from leantrain.run.summary import utilization

    def achieved(tp: int, pp: int) -> float:
        plan = types.SimpleNamespace(device=torch.device("cpu"), precision="fp32", tf32=False,
                                     tp=tp, pp=pp)
        return utilization(plan, 1e6, 100.0)["achieved_flops_per_second"]

    assert achieved(1, 1) == 1e8 and achieved(2, 1) == 5e7 and achieved(2, 2) == 2.5e7


def test_sequence_parallel_needs_a_plan_that_splits_the_whole_stream():
    """plan.parallel.sp: refused in one line for a tied head and embedding, for a layer the
    plan keeps whole (a mixture of experts' router), and without tp or with a user's hook."""
    import shapes
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantrain.config import config_from_dict
    from leantrain.distributed import DistContext
    from leantrain.run.plan import resolve_plan
    from leantrain.tensor_parallel import check_sequence_parallel, layer_plan

    check_sequence_parallel(shapes.llama_gqa(), layer_plan(shapes.llama_gqa(), 2), 2)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        tie_word_embeddings=True))
    with pytest.raises(LeantrainError, match="does not split its embedding"):
        check_sequence_parallel(tied, layer_plan(tied, 2), 2)
    with pytest.raises(LeantrainError, match=r"model.layers.0.mlp.gate \(.*\) is neither split"):
        check_sequence_parallel(shapes.mixtral(), layer_plan(shapes.mixtral(), 2), 2)
    for parallel in ({"sp": True}, {"sp": True, "tp": 2, "tp_plan": "mine:split"}):
        cfg = config_from_dict({"plan": {"device": "cpu", "parallel": parallel}})
        with pytest.raises(LeantrainError, match="needs plan.parallel.tp > 1 and the model's "
                                                 "own plan"):
            resolve_plan(cfg.plan, shapes.llama_gqa(), 16, "adamw", DistContext(0, 0, 2, True))


@pytest.mark.slow
def test_sequence_parallel_with_loss_parallel_gives_one_process_gradients(tmp_path):
    """tp=2 with sequence parallel on a stock GQA Llama: norms split over the sequence, the
    loss over vocabulary-split logits. One SGD step at lr 1 moves each weight by its
    gradient: the whole weights after it equal one process's within 1e-6, so every
    parameter's gradient does; the token accuracy, taken from the split logits, is one
    process's too."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    common = ["--model", "shapes:llama_gqa", "--data", "shapes:lm_data", "--epochs", "1",
              "--no-progress", "--precision", "fp32", "--set", "train.log_every=1", "--set",
              "train.monitor_interval_s=0", "--set", "train.max_steps=1", "--set",
              "data.batch_size=8", "--set", "optim.name=sgd", "--set", "optim.lr=1.0"]
    one, split = tmp_path / "one", tmp_path / "sp"
    train_here(["train", *common, "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *common, "--set",
          "plan.parallel.tp=2", "--set", "plan.parallel.sp=true", "--out", str(split)],
         env=env)
    a = torch.load(one / "model.pt", weights_only=True)
    b = torch.load(split / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    records = [[json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, split)]
    (x,), (y,) = ([r for r in rs if r["kind"] == "train"] for rs in records)
    assert abs(x["loss"] - y["loss"]) < 1e-6 and x["accuracy"] == y["accuracy"]
    assert [r["val_accuracy"] for r in records[0] if "val_accuracy" in r] == \
        [r["val_accuracy"] for r in records[1] if "val_accuracy" in r]
    outcome = json.loads((split / "summary.json").read_text())["plan"]["outcomes"]
    assert "sequence parallel: the norms over the sequence" in outcome["distributed"]


def test_a_run_folders_tensor_parallel_plan_is_imported_only_when_named_again(tmp_path):
    import argparse

    from leantrain.commands.common import refuse_folder_code
    from leantrain.config import config_from_dict

    cfg = config_from_dict({"plan": {"parallel": {"tp": 2, "tp_plan": "evil:split"}}})
    bare = argparse.Namespace(overrides=[], model=None, data=None)
    with pytest.raises(LeantrainError, match="names code to import .--set "
                                             "plan.parallel.tp_plan=evil:split.; leantrain"):
        refuse_folder_code(cfg, tmp_path, bare)
    vouched = argparse.Namespace(overrides=["plan.parallel.tp_plan=evil:split"], model=None,
                                 data=None)
    refuse_folder_code(cfg, tmp_path, vouched)  # the user named it again: allowed
    with pytest.raises(LeantrainError, match="set plan.parallel.tp to the ranks"):
        from leantrain.run.plan import resolve_plan

        resolve_plan(config_from_dict({"plan": {"parallel": {"tp_plan": "m:f"}}}).plan,
                     torch.nn.Linear(2, 2))
