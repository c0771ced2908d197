"""Pipeline parallel (plan.parallel.pp): stages cut from the model the user brought, run by
torch.distributed.pipelining's schedules on 2 gloo processes, checked against one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_here
from shapes import gpt2_deep, llama_gqa, t5, whisper
from test_bench import USER_MODULE

from leantrain import pipeline
from leantrain.distributed import DistContext
from leantrain.errors import LeantrainError
from leantrain.recipes.gpt import GPT
from leantrain.run.plan import resolve_strategy

LEANTRAIN = [sys.executable, "-m", "leantrain"]
SHAPES_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_stages_are_contiguous_balanced_ranges_of_the_blocks():
    for blocks in range(1, 30):
        for stages in range(1, blocks + 1):
            ranges = pipeline.stage_ranges(blocks, stages)
            assert [i for r in ranges for i in r] == list(range(blocks))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("make, lists", [(t5, "encoder.block, decoder.block"),
                                         (whisper, "model.encoder.layers, model.decoder.layers")])
def test_an_encoder_decoder_has_two_block_lists_and_is_refused_naming_them(make, lists):
    with pytest.raises(LeantrainError) as err:
        pipeline.check(make(), 2, "1f1b", 2)
    assert lists in str(err.value) and "\n" not in str(err.value)


def test_too_few_blocks_or_micro_batches_are_refused_before_training():
    with pytest.raises(LeantrainError, match="makes 4 stages, but LlamaForCausalLM has 2"):
        pipeline.check(llama_gqa(), 2, "interleaved-1f1b", 4)
    with pytest.raises(LeantrainError, match=r"plan.grad_accum \(3\) must be a multiple"):
        pipeline.check(gpt2_deep(), 2, "interleaved-1f1b", 3)
    pipeline.check(gpt2_deep(), 2, "interleaved-1f1b", 4)


def test_the_probe_finds_what_feeds_the_first_block_and_what_feeds_the_loss():
    gpt2 = gpt2_deep()
    ids = torch.randint(0, 40, (2, 8))
    roles = pipeline.find_roles(gpt2, lambda m: m(input_ids=ids, labels=ids).loss, 4)
    assert roles.before == {"transformer.wte.weight", "transformer.wpe.weight"}
    # the head is tied to the embedding: one parameter on both ends
    assert roles.after == {"transformer.wte.weight", "transformer.ln_f.weight",
                           "transformer.ln_f.bias"}
    # the text-gpt recipe adds a learned position parameter of its own, outside any module
    gpt = GPT(vocab=50, context=8, width=16, depth=4, heads=2)
    roles = pipeline.find_roles(gpt, lambda m: m(ids % 50).logsumexp(-1).mean(), 4)
    assert "position" in roles.before and "embed.weight" in roles.before
    assert {"norm.weight", "embed.weight"} <= roles.after  # (its head is the embedding too)
    assert all(p.grad is None for p in gpt.parameters())  # (the probe leaves no gradient)


class _Handed(torch.nn.Module):
    """A parameter outside the blocks used between them (and after the last)."""

    def __init__(self):
        super().__init__()
        self.embed, self.rel = torch.nn.Embedding(8, 4), torch.nn.Parameter(torch.full((4,), .5))
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x) * self.rel
        return x


class _Numbered(_Handed):
    """A forward that numbers its blocks by their place in the loop."""

    def forward(self, ids):
        x = self.embed(ids) * self.rel
        for i, block in enumerate(self.blocks):
            x = block(x) + i
        return x


class _Scaled(torch.nn.Linear):
    def forward(self, x, scale):
        return super().forward(x) * scale


class _Passed(_Handed):
    """A parameter outside the blocks passed into each (DeBERTa's relative embeddings)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Scaled(4, 4) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, scale=self.rel)
        return x


@pytest.mark.parametrize("model, why", [
    (_Passed, "rel lives outside the blocks but is handed to them"),
    (_Handed, "does not run its blocks as a plain list"),
    (_Numbered, "does not run its blocks as a plain list")])
def test_a_model_that_cannot_be_cut_at_its_blocks_is_refused_in_one_line(model, why):
    ids = torch.randint(0, 8, (2, 3))
    with pytest.raises(LeantrainError, match=why) as err:
        pipeline.find_roles(model(), lambda m: m(ids).square().mean(), 2)
    assert "\n" not in str(err.value)


def test_1f1b_needs_a_micro_batch_for_every_stage():
    with pytest.raises(LeantrainError, match=r"plan.grad_accum \(1\) must be at least pp"):
        pipeline.check(gpt2_deep(), 2, "1f1b", 1)
    pipeline.check(gpt2_deep(), 2, "gpipe", 1)


def test_pipeline_parallel_is_refused_without_its_processes():
    with pytest.raises(LeantrainError, match="needs processes started by `leantrain launch"):
        resolve_strategy("auto", DistContext(), pp=2)
    with pytest.raises(LeantrainError, match="the 3 processes a multiple of pp"):
        resolve_strategy("auto", DistContext(0, 0, 3, True), pp=2)
    assert resolve_strategy("auto", DistContext(0, 0, 4, True), pp=2) == "pp"
    with pytest.raises(LeantrainError, match="plan.distributed=auto"):
        resolve_strategy("fsdp", DistContext(0, 0, 2, True), pp=2)
    assert resolve_strategy("auto", DistContext(0, 0, 2, True), pp=2) == "pp"
    assert resolve_strategy("auto", DistContext(0, 0, 4, True), tp=2, pp=2) == "pp"
    with pytest.raises(LeantrainError, match=r"multiple of pp x tp \(4"):
        resolve_strategy("auto", DistContext(0, 0, 2, True), tp=2, pp=2)


def test_a_one_process_train_with_pp_exits_2_in_one_line_before_any_work(tmp_path):
    done = subprocess.run([*LEANTRAIN, "train", "--model", "shapes:llama_gqa", "--data",
                           "shapes:lm_data", "--set", "plan.parallel.pp=2", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True,
                          env=SHAPES_ENV)
    assert done.returncode == 2
    err = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "plan.parallel.pp=2 needs processes" in err[0], done.stderr
    assert not (tmp_path / "run").exists()


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=SHAPES_ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def _records(run: Path, kind: str) -> list[dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == kind]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in _records(run, "train")]


def _pipelined(args: list[str], out: Path, schedule: str, *extra: str) -> None:
    _run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *args, "--set",
          "plan.parallel.pp=2", "--set", f"plan.parallel.pp_schedule={schedule}", *extra,
          "--out", str(out)])


# one process's run and the pipeline's: fp32, the same micro-batches (plan.grad_accum 2)
COMMON = ["--no-progress", "--precision", "fp32", "--set", "plan.optimizer_impl=fused",
          "--set", "plan.grad_accum=2", "--set", "train.log_every=1", "--set",
          "train.monitor_interval_s=0"]


@pytest.mark.slow
def test_a_stock_llama_with_grouped_query_attention_trains_in_2_stages_as_one_process(
        tmp_path):
    """pp=2 (1F1B) on a stock Llama with GQA: 20 steps' losses (clipping at every step, its
    norm reduced across the stages; a warmed-up cosine schedule) and every evaluation equal
    one process's; the final weights load into the plain model; the step-10 checkpoint (DCP,
    each process its stages) resumes on one process, ending with the uninterrupted losses
    (the schedule's learning rate restored)."""
    args = ["--model", "shapes:llama_gqa", "--data", "shapes:lm_data", *COMMON, "--epochs",
            "2", "--set", "data.batch_size=8", "--set", "train.max_steps=20", "--set",
            "train.clip_norm=0.05", "--set", "train.eval_every_steps=5", "--set",
            "schedule.name=cosine", "--set", "schedule.warmup_fraction=0.2"]
    one, staged = tmp_path / "one", tmp_path / "pp"
    train_here(["train", *args, "--out", str(one)])
    _pipelined(args, staged, "1f1b", "--set", "train.checkpoint_every=10", "--set",
               "train.keep_checkpoints=3")
    a, b = _losses(one), _losses(staged)
    assert len(a) == len(b) == 20 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    evals = [[r[k] for r in _records(run, "eval")] for run in (one, staged)
             for k in ("val_loss", "val_accuracy")]
    assert len(evals[0]) == 3 and evals[0] == pytest.approx(evals[2], abs=1e-6)
    assert evals[1] == pytest.approx(evals[3], abs=1e-6)
    summary = json.loads((staged / "summary.json").read_text())
    assert summary["plan"]["pp"] == 2 and summary["plan"]["microbatches"] == 2
    llama_gqa().load_state_dict(torch.load(staged / "model.pt", weights_only=True))
    for layout in ("alone",):  # (on 2 stages again: as the other sharded resumes)
        again = tmp_path / layout
        shutil.copytree(staged, again)
        for later in ("step-00000016", "step-00000020"):  # (the epoch's end, the run's)
            shutil.rmtree(again / "checkpoints" / later)
        (again / "checkpoints" / "latest").write_text("step-00000010")
        for name in ("summary.json", "model.pt", "model.pt.sha256"):
            (again / name).unlink(missing_ok=True)
        shutil.rmtree(again / "pretrained")
        resume = ["train", "--resume", str(again), "--model", "shapes:llama_gqa", "--data",
                  "shapes:lm_data", "--no-progress"]
        if layout == "alone":
            train_here([*resume, "--set", "plan.parallel.pp=1"])
        else:
            _run([*LEANTRAIN, "launch", "--nproc", "2", "--", *resume])
        c = _losses(again)
        assert len(c) == 20 and max(abs(x - y) for x, y in zip(b, c, strict=True)) < 1e-5


@pytest.mark.slow
def test_pipeline_stages_split_by_tensor_parallel_on_4_processes_train_as_one_process(
        tmp_path):
    """pp=2 x tp=2 (each stage's layers split over 2 ranks, the model's own plan) on a stock
    GQA Llama: 6 steps with clipping (its norm joined over both meshes and the stages) equal
    one process's; each rank holds half of its stage's projections; model.pt is the whole
    model; the step-3 checkpoint resumes on one process."""
    from torch.distributed.checkpoint import FileSystemReader

    args = ["--model", "shapes:llama_gqa", "--data", "shapes:lm_data", *COMMON, "--epochs",
            "1", "--set", "data.batch_size=8", "--set", "train.max_steps=6", "--set",
            "train.clip_norm=0.05"]
    one, staged = tmp_path / "one", tmp_path / "pp-tp"
    train_here(["train", *args, "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "4", "--", "train", *args, "--set",
          "plan.parallel.pp=2", "--set", "plan.parallel.tp=2", "--set",
          "train.checkpoint_every=3", "--out", str(staged)])
    a, b = _losses(one), _losses(staged)
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    summary = json.loads((staged / "summary.json").read_text())
    assert "tensor parallel over 2 ranks" in summary["plan"]["outcomes"]["distributed"]
    step3 = staged / "checkpoints" / "step-00000003"
    tensors = FileSystemReader(str(step3)).read_metadata().state_dict_metadata
    for name, local in [("model.model.layers.0.self_attn.q_proj.weight", [16, 32]),
                        ("model.model.layers.1.mlp.down_proj.weight", [32, 32])]:
        assert [list(c.sizes) for c in tensors[name].chunks] == [local, local], name
    llama_gqa().load_state_dict(torch.load(staged / "model.pt", weights_only=True))
    again = tmp_path / "alone"
    shutil.copytree(staged, again)
    shutil.rmtree(again / "checkpoints" / "step-00000006")
    (again / "checkpoints" / "latest").write_text("step-00000003")
    for name in ("summary.json", "model.pt", "model.pt.sha256"):
        (again / name).unlink(missing_ok=True)
    shutil.rmtree(again / "pretrained")
    train_here(["train", "--resume", str(again), "--model", "shapes:llama_gqa",
                "--data", "shapes:lm_data", "--no-progress", "--set", "plan.parallel.pp=1",
                "--set", "plan.parallel.tp=1", "--set", "plan.distributed=auto"])
    c = _losses(again)
    assert len(c) == 6 and max(abs(x - y) for x, y in zip(b, c, strict=True)) < 1e-5


@pytest.mark.slow
def test_a_stock_gpt2_with_a_tied_head_trains_under_each_schedule_as_one_process(tmp_path):
    """GPipe, 1F1B and interleaved 1F1B (2 stages a process) on a stock GPT-2, whose head is
    its embedding (the two ends' copies take one summed gradient): 4 steps' losses within
    1e-6 of one process accumulating the same micro-batches."""
    args = ["--model", "shapes:gpt2_deep", "--data", "shapes:lm_data", *COMMON, "--epochs",
            "1", "--set", "data.batch_size=8", "--set", "optim.name=adamw", "--set",
            "train.max_steps=4"]
    one = tmp_path / "one"
    train_here(["train", *args, "--out", str(one)])
    for schedule in ("gpipe", "1f1b", "interleaved-1f1b"):
        staged = tmp_path / schedule
        _pipelined(args, staged, schedule)
        a, b = _losses(one), _losses(staged)
        assert len(a) == len(b) == 4
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6, schedule
        # FLOPs counted on the whole model before the cut: one process's, per sample
        flops = [json.loads((run / "summary.json").read_text())["flops_per_sample"]
                 for run in (one, staged)]
        assert flops[0] and flops[1] == pytest.approx(flops[0], rel=1e-6)
        weights = torch.load(staged / "model.pt", weights_only=True)
        assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


@pytest.mark.slow
def test_the_text_gpt_recipe_trains_under_each_schedule_as_one_process(tmp_path):
    """The text-gpt recipe (its position parameter lives on the first stage, its head tied)
    under the interleaved schedules (GPipe and 1F1B on a tied head: the GPT-2 test): losses
    within 1e-6 of one process, and an evaluation whose batches (7 rows) do not split evenly
    into the micro-batches."""
    args = ["--recipe", "text-gpt", "--data", str(Path(__file__).parents[1] / "examples"),
            *COMMON, "--epochs", "1", "--set", "data.max_bytes=20000", "--set",
            "data.context=32", "--set", "gpt.depth=4", "--set", "train.max_steps=5", "--set",
            "data.eval_batch_size=7"]
    one = tmp_path / "one"
    train_here(["train", *args, "--out", str(one)])
    for schedule in ("interleaved-1f1b", "interleaved-zero-bubble"):
        staged = tmp_path / schedule
        _pipelined(args, staged, schedule)
        a, b = _losses(one), _losses(staged)
        assert len(a) == len(b) == 5
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6, schedule
        ends = [_records(run, "epoch")[-1] for run in (one, staged)]
        assert ends[0]["val_loss"] == pytest.approx(ends[1]["val_loss"], abs=1e-6), schedule
        assert ends[0]["val_accuracy"] == ends[1]["val_accuracy"], schedule


def test_a_stage_holds_its_share_of_the_weights_and_of_the_activations():
    """Shares from one forward: a block's layers are its stage's, the embeddings the first
    stage's, the final norm and head the last's; a tied embedding and head are held by
    both (the shares then sum past 1); the activation sent is one micro-batch's hidden
    states."""
    from leantrain import pipeline

    def call(model):
        ids = torch.arange(16).view(2, 8) % 48
        return model(input_ids=ids, labels=ids).loss

    untied = llama_gqa()
    shares = pipeline.stage_shares(untied, call, 2)
    assert sum(shares.params) == pytest.approx(1) and sum(shares.produced) == pytest.approx(1)
    embed = untied.model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in untied.parameters())
    first = (embed + sum(p.numel() for p in untied.model.layers[0].parameters())) / total
    assert shares.params[0] == pytest.approx(first)
    assert shares.sent == 2 * 8 * 32 * 4  # (2 rows x 8 tokens x 32 wide, fp32)
    tied = pipeline.stage_shares(gpt2_deep(), call, 2)
    assert sum(tied.params) > 1  # the tied weight counted on both ends
    assert [pipeline.in_flight("1f1b", 4, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert pipeline.in_flight("gpipe", 4, 3, 8) == 8
    assert pipeline.in_flight("interleaved-1f1b", 2, 0, 4) == 5


def test_doctor_prices_each_rank_of_a_pipeline(tmp_path, capsys):
    """doctor --ranks 2 with pp=2: each rank priced by its stage's shares and its
    micro-batches in flight, below the whole model's peak; a layout a launch would refuse is
    one line."""
    from leantrain.cli import main
    from leantrain.commands.doctor import launch_layout
    from leantrain.config import config_from_dict

    cfg = config_from_dict({"plan": {"parallel": {"pp": 2}, "grad_accum": 4}})
    _, layout = launch_layout(cfg, 2, gpt2_deep)
    assert (layout.pp, layout.strategy, layout.microbatches) == (2, "pp", 4)
    assert launch_layout(cfg, 4, gpt2_deep)[1].strategy == "fsdp"  # 2 pipelines
    with pytest.raises(LeantrainError, match="must be a multiple of pp x tp"):
        launch_layout(cfg, 3, gpt2_deep)
    both = config_from_dict({"plan": {"parallel": {"pp": 2, "tp": 2}, "grad_accum": 4}})
    _, layout = launch_layout(both, 4, llama_gqa)  # stages split by the model's own plan
    assert (layout.pp, layout.tp, layout.strategy) == (2, 2, "pp") and 0.5 < layout.split < 1
    out = tmp_path / "doctor"
    code = main(["doctor", "--model", "shapes:llama_gqa", "--data", "shapes:lm_data",
                 "--epochs", "1", "--steps", "1", "--no-profile", "--no-compile-check",
                 "--out", str(out), "--ranks", "2", "--set", "plan.parallel.pp=2", "--set",
                 "plan.grad_accum=4", "--set", "data.batch_size=4"])
    assert code == 0, capsys.readouterr().err
    assert "2 pipeline stages (1f1b, 4 micro-batches" in capsys.readouterr().out
    memory = json.loads((out / "doctor.json").read_text())["memory"]
    ranks = memory["per_rank"]
    assert len(ranks["stage_peak_bytes"]) == 2 and ranks["pp"] == 2
    assert max(ranks["stage_peak_bytes"]) == ranks["training_peak_bytes"] < \
        memory["peak_bytes"]


def test_where_one_device_is_too_small_pipeline_stages_are_priced_with_what_they_send(
        monkeypatch):
    """A Llama that does not fit: the estimate prices pipeline stages over the smallest N
    that fits, and says what each stage sends per micro-batch."""
    import shapes

    from leantrain.bench import memory_estimate
    from leantrain.config import config_from_dict
    from leantrain.data import DataBundle

    bundle = DataBundle(*shapes.lm_data(), num_classes=None, description="counting")
    cfg = config_from_dict({"data": {"batch_size": 8}, "train": {"epochs": 1},
                            "optim": {"name": "adamw", "lr": 1e-3},
                            "plan": {"device": "cpu", "precision": "fp32"}})
    one = memory_estimate.estimate(shapes.llama_gqa, bundle, cfg)
    room = int(one.peak_bytes * 0.9 / (1 - memory_estimate.MARGIN))
    monkeypatch.setattr(memory_estimate, "device_room", lambda device: (room, "a fake GPU"))
    est = memory_estimate.estimate(shapes.llama_gqa, bundle, cfg)
    staged = next(o for o in est.options if o["advice"].startswith("pipeline stages over 2"))
    assert "--set plan.parallel.pp=2 --set plan.grad_accum=2" in staged["advice"]
    # 8 rows x 16 tokens x 32 wide, fp32
    assert "each stage sends 0.02 MiB of activations per micro-batch" in staged["advice"]
    assert staged["saves_bytes"] > 0


@pytest.mark.slow
def test_two_pipelines_of_2_stages_on_4_processes_train_as_one_process_and_resume_on_one(
        tmp_path):
    """pp=2 x 2 data-parallel ranks (each stage FSDP2-sharded over them) on a tied GPT-2
    under interleaved 1F1B: the global batch trains as one process does (clipping at every
    step); its checkpoint (DCP: shards of stages) resumes on one process exactly."""
    args = ["--model", "shapes:gpt2_deep", "--data", "shapes:lm_data", *COMMON, "--epochs",
            "1", "--set", "train.max_steps=8", "--set", "train.clip_norm=0.05", "--set",
            "optim.name=adamw"]
    one, staged = tmp_path / "one", tmp_path / "pp"
    train_here(["train", *args, "--set", "data.batch_size=16", "--out", str(one)])
    _run([*LEANTRAIN, "launch", "--nproc", "4", "--", "train", *args, "--set",
          "data.batch_size=8", "--set", "plan.parallel.pp=2", "--set",
          "plan.parallel.pp_schedule=interleaved-1f1b", "--set", "train.checkpoint_every=4",
          "--set", "train.keep_checkpoints=3", "--out", str(staged)])
    a, b = _losses(one), _losses(staged)
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    again = tmp_path / "alone"
    shutil.copytree(staged, again)
    shutil.rmtree(again / "checkpoints" / "step-00000008")
    (again / "checkpoints" / "latest").write_text("step-00000004")
    for name in ("summary.json", "model.pt", "model.pt.sha256"):
        (again / name).unlink()
    shutil.rmtree(again / "pretrained")
    train_here(["train", "--resume", str(again), "--model", "shapes:gpt2_deep", "--data",
                "shapes:lm_data", "--no-progress", "--set", "plan.parallel.pp=1", "--set",
                "data.batch_size=16"])
    c = _losses(again)
    assert len(c) == 8 and max(abs(x - y) for x, y in zip(b, c, strict=True)) < 1e-5


@pytest.mark.slow
def test_a_custom_classifier_on_torchs_transformer_encoder_trains_in_stages_as_one_process(
        tmp_path):
    """Not Hugging Face: tuple batches, a learned position parameter on the root, and
    torch's TransformerEncoder, whose forward reads `layers[0]` (a block of the other stage
    on the second process): the same losses and accuracy as one process."""
    (tmp_path / "families.py").write_text(USER_MODULE)
    env = dict(SHAPES_ENV, PYTHONPATH=f"{tmp_path}{os.pathsep}{SHAPES_ENV['PYTHONPATH']}")
    args = ["--model", "families:transformer", "--data", "families:tokens", *COMMON,
            "--epochs", "2", "--set", "data.batch_size=40"]
    one, staged = tmp_path / "one", tmp_path / "pp"
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("families", None)  # (the bench tests' module of that name)
    try:
        train_here(["train", *args, "--out", str(one)])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("families", None)
    done = subprocess.run([*LEANTRAIN, "launch", "--nproc", "2", "--", "train", *args, "--set",
                           "plan.parallel.pp=2", "--out", str(staged)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _losses(one), _losses(staged)
    assert len(a) == len(b) == 10 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    ends = [_records(run, "epoch")[-1]["val_accuracy"] for run in (one, staged)]
    assert ends[0] == ends[1]


def test_context_parallel_is_refused_off_cuda_with_the_reason():
    from leantrain.config import config_from_dict
    from leantrain.run.plan import resolve_plan

    cfg = config_from_dict({"plan": {"device": "cpu", "parallel": {"cp": 2}}})
    with pytest.raises(LeantrainError, match="CUDA's attention kernels .* device is cpu"):
        resolve_plan(cfg.plan, gpt2_deep())
