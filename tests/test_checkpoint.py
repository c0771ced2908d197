import os
import pickle
import random

import numpy as np
import pytest
import torch

from leantrain.checkpoint import atomic_save, capture_rng, load_checkpoint, restore_rng
from leantrain.errors import LeantrainError


def test_atomic_save_roundtrip_weights_only(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"w": torch.arange(3), "step": 7}, path)
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["w"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "ck.pt.sha256"]  # its SHA-256 beside it


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "ck.pt.sha256"]


def test_loading_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump(random.Random(), handle)  # an object weights_only must not build
    with pytest.raises(LeantrainError, match="holds Python objects besides tensors") as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value)  # torch's advice is not repeated
    with pytest.raises(LeantrainError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_survives_a_weights_only_roundtrip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    atomic_save({"rng": capture_rng()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loads a checkpoint onto a GPU")
def test_rng_state_restores_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    atomic_save({"rng": capture_rng()}, tmp_path / "r.pt")
    expected = torch.rand(3)
    restore_rng(load_checkpoint(tmp_path / "r.pt", torch.device("cuda"))["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_resume_clears_the_temp_file_of_a_write_that_was_killed(tmp_path):
    from leantrain.checkpoint import remove_partial_writes

    atomic_save({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    (tmp_path / ".checkpoint.pt.ab12cd.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".checkpoint.pt.ab12cd.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256",
                                                          "notes.tmp"]


def test_a_torchao_whose_import_fails_with_a_warning_made_an_error_does_not_break_loading(
        tmp_path, monkeypatch):
    """The loader imported torchao's optimizer-state types catching ImportError only: under
    `-W error` a deprecation warning at import broke every checkpoint load."""
    import sys
    import types

    from leantrain.checkpoint import atomic_save, load_checkpoint

    class Deprecated(types.ModuleType):
        def __getattr__(self, name):
            raise DeprecationWarning(f"{name} is deprecated")

    for name in ("torchao.optim.subclass_4bit", "torchao.optim.subclass_8bit"):
        monkeypatch.setitem(sys.modules, name, Deprecated(name))
    atomic_save({"w": torch.ones(2)}, tmp_path / "model.pt")
    assert torch.equal(load_checkpoint(tmp_path / "model.pt")["w"], torch.ones(2))


def test_loading_a_checkpoint_keeps_torchaos_import_chatter_off_the_terminal(tmp_path):
    import subprocess
    import sys

    script = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
              "from leantrain.checkpoint import atomic_save, load_checkpoint\n"
              f"atomic_save({{'w': torch.ones(2)}}, {str(tmp_path / 'm.pt')!r})\n"
              f"load_checkpoint({str(tmp_path / 'm.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchao" not in done.stderr and "_pytree" not in done.stderr, done.stderr[-2000:]


def test_a_checkpoint_older_than_a_config_key_resumes_and_a_save_setting_may_change(tmp_path):
    """A key added after a checkpoint was written (train.keep_checkpoints, plan.parallel.*),
    at its default, is no change of config: the old checkpoint resumes (it was refused,
    "keep_checkpoints (None -> 2)"); and how a run saves may change on resume."""
    from leantrain.cli import main

    run = tmp_path / "run"
    assert main(["train", "--no-progress", "--set", "train.max_steps=2", "--out",
                 str(run)]) == 0
    saved = load_checkpoint(run / "checkpoint.pt")
    for key in ("train.keep_checkpoints", "plan.parallel.tp", "plan.parallel.dp_replicate",
                "plan.parallel.dp_shard"):
        del saved["fingerprint"]["config"][key]  # as written before the key existed
    atomic_save(saved, run / "checkpoint.pt")
    for name in ("summary.json", "model.pt", "model.pt.sha256"):  # as a kill leaves it
        (run / name).unlink(missing_ok=True)
    assert main(["train", "--no-progress", "--resume", str(run), "--set",
                 "train.max_steps=3", "--set", "train.keep_checkpoints=3"]) == 0
