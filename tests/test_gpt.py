"""text-gpt: byte-level text data, the GPT, activation checkpointing, FLOPs, generate."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from leantrain.cli import main
from leantrain.data.text import STDLIB, load_text, stdlib_sources
from leantrain.errors import LeantrainError
from leantrain.measure.flops import count_flops
from leantrain.recipes.gpt import GPT, generate, parameters_without_embeddings
from leantrain.techniques.base import Context
from leantrain.techniques.checkpointing import (
    apply_activation_checkpointing,
    check,
    recompute_paused,
)


def test_text_is_split_by_file_into_next_byte_samples(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_bytes(bytes([65 + i]) * 300)
    train, val, description = load_text(str(tmp_path), 16, 0.2, 10_000)
    x, y = train.tensors
    assert x.shape[1] == 16 and torch.equal(x[0, 1:], y[0, :-1])  # y is x shifted by one
    train_bytes = set(x.unique().tolist())
    val_bytes = set(val.tensors[0].unique().tolist())
    assert not train_bytes & val_bytes  # whole files on one side only
    assert "2 held out" in description


def test_the_default_corpus_is_the_standard_library():
    files = stdlib_sources()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    train, val, _ = load_text(STDLIB, 64, 0.1, 50_000)
    assert len(train) == (50_000 - 1) // 64 and len(val) > 0


def test_missing_text_path_is_a_clear_error():
    with pytest.raises(LeantrainError, match="text path not found: /no/such"):
        load_text("/no/such", 16, 0.1, 1000)


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, -2), y.flatten())


def test_activation_checkpointing_keeps_loss_and_gradients_and_saves_memory():
    torch.manual_seed(0)
    plain = GPT(context=64, depth=3, width=64, heads=4)
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain))
    assert check(Context(torch.device("cpu"), plain))[0]
    x, y = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))
    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(model, x, y)
        loss.backward()
        saved[name] = (total, loss.item())
    assert saved["plain"][1] == pytest.approx(saved["ckpt"][1], abs=1e-6)
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert saved["ckpt"][0] < 0.5 * saved["plain"][0]  # activation memory held for backward
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints stay loadable


def test_training_flops_match_6n_plus_the_attention_term():
    model = GPT(context=64, depth=2, width=64, heads=4)
    x, y = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))
    per_token = count_flops(lambda: _loss(model, x, y).backward()) / x.numel()
    analytic = 6 * (parameters_without_embeddings(model) + 64 * 256) + 12 * 2 * 64 * 64
    assert per_token == pytest.approx(analytic, rel=0.05)


def test_generate_continues_the_prompt_within_the_context():
    model = GPT(context=8, depth=1, width=32, heads=2)
    prompt = torch.tensor(list(b"abc"))
    out = generate(model, prompt, 20, 8, temperature=0.8, top_k=5,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (23,) and torch.equal(out[:3], prompt)
    greedy = generate(model, prompt, 5, 8, temperature=0)
    assert torch.equal(greedy, generate(model, prompt, 5, 8, temperature=0))


def test_text_gpt_trains_below_the_first_loss_and_generates(tmp_path, capsys):
    """Sized by the gpt.* keys, untied, with accumulation to a tokens-per-step target; generate
    rebuilds the same architecture from the run's saved config."""
    out = tmp_path / "gpt"
    args = ["train", "--recipe", "text-gpt", "--epochs", "1", "--set", "data.max_bytes=40000",
            "--set", "data.context=32", "--set", "train.log_every=2", "--out", str(out),
            "--set", "gpt.depth=2", "--set", "gpt.width=64", "--set", "gpt.heads=2",
            "--set", "gpt.tie_weights=false", "--set", "plan.tokens_per_step=2048",
            "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_bits_per_byte"] < 8 and summary["tokens_per_second"] > 0
    assert summary["plan"]["grad_accum"] == 2  # 2048 tokens / (32 samples x 32 bytes)
    assert "2,048 tokens per step" in summary["plan"]["outcomes"]["grad_accum"]
    state = torch.load(out / "model.pt", weights_only=True)
    assert len({k.split(".")[1] for k in state if k.startswith("blocks.")}) == 2
    assert state["head.weight"].shape == (256, 64)
    assert not torch.equal(state["head.weight"], state["embed.weight"])  # untied
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--tokens",
                 "10"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    raw = b"caf\xe9 ".decode("utf-8", "surrogateescape")  # (a Latin-1 byte on the command line)
    assert main(["generate", "--checkpoint", str(out), "--prompt", raw, "--tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("caf")
    for bad, said in (([""], "--prompt is empty"), (["x", "--seed", str(10**23)], "--seed")):
        assert main(["generate", "--checkpoint", str(out), "--prompt", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_generate_on_a_non_text_run_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
    assert "is not a text run" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_generate_refuses_a_temperature_it_cannot_sample_at(tmp_path, capsys, value):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    (run / "model.pt").write_bytes(b"")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x", "--temperature",
                 value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--temperature must be >= 0 (0: greedy) and finite" in err[0]


def test_tokens_per_step_errors_name_the_keys():
    from leantrain.config import PlanConfig
    from leantrain.run.plan import resolve_plan

    model = GPT(context=8, depth=1, width=16, heads=2)
    with pytest.raises(LeantrainError, match="for language models"):
        resolve_plan(PlanConfig(device="cpu", tokens_per_step=64), model)
    with pytest.raises(LeantrainError, match="not both"):
        resolve_plan(PlanConfig(device="cpu", tokens_per_step=64, grad_accum=2), model, 32)
    assert resolve_plan(PlanConfig(device="cpu", tokens_per_step=100), model, 32).grad_accum == 3


def test_gpt_width_must_divide_by_heads():
    from leantrain.config import load_config

    with pytest.raises(LeantrainError, match="gpt.width.*divisible by gpt.heads"):
        load_config(None, ["gpt.width=100", "gpt.heads=3"])


def test_mfu_counts_model_flops_not_the_recompute():
    model = GPT(context=8, depth=2, width=16, heads=2)
    x = torch.randint(0, 256, (2, 8))

    def step():
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()

    plain = count_flops(step)
    apply_activation_checkpointing(model)
    assert count_flops(step) > plain  # the recomputed forward
    with recompute_paused(model):
        assert count_flops(step) == plain
    assert count_flops(step) > plain and model.blocks[0].checkpointed  # restored


@pytest.mark.slow
def test_bench_measures_the_text_gpt_techniques_and_train_uses_its_plan(tmp_path, capsys):
    small = ["--set", "data.max_bytes=20000", "--set", "data.context=16", "--set", "gpt.depth=1",
             "--set", "gpt.width=32", "--set", "gpt.heads=2"]
    out = tmp_path / "bench"
    assert main(["bench", "--recipe", "text-gpt", *small, "--budget-s", "20",
                 "--keep-batch-size", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "winner (*)" in table
    assert "activation_checkpointing" in table  # listed as not ranked, with its reason
    raw = json.loads((out / "bench.json").read_text())
    trials = {t["name"]: t for t in raw["trials"]}
    assert {"bf16", "fused optimizer", "compile"} <= set(trials)  # each listed, run or not
    assert trials["channels_last"]["status"] == "unsupported"  # a transformer has no convs
    run = tmp_path / "run"
    assert main(["train", "--recipe", "text-gpt", *small, "--plan", str(out / "plan.yaml"),
                 "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["tokens_per_second"] > 0
