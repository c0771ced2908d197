"""Token shards and tokenized corpora: windows read without loading the corpus, a corpus
tokenized once and cached, a language model that learns on them, and one line for each kind of
bad data."""

import json
import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from leantrain.cli import main
from leantrain.data.tokenize import tokenized
from leantrain.data.tokens import TokenWindows, open_token_folder, write_token_folder
from leantrain.errors import LeantrainError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of text files (some of the standard library's sources)."""
    folder = tmp_path_factory.mktemp("corpus")
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:24]
    for path in sources:
        (folder / f"{path.stem}.txt").write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus) -> Path:
    """A byte-level BPE tokenizer of 400 ids trained on the corpus (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([str(p) for p in sorted(corpus.iterdir())], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_windows_read_each_shards_tokens_in_order_without_crossing_shards(tmp_path):
    ids = [np.arange(0, 23), np.arange(100, 150)]
    folder = write_token_folder(tmp_path / "t", {"train": iter(ids), "val": iter([ids[0]])},
                                vocab_size=200, eot=None, shard_tokens=30)
    assert [s.tokens for s in folder.splits["train"]] == [30, 30, 13]  # 73 tokens, by 30
    assert all(s.dtype == np.uint16 for s in folder.splits["train"])
    windows = folder.windows("train", 4)
    assert len(windows) == 7 + 7 + 3  # (30 - 1) // 4, twice, then (13 - 1) // 4
    whole = np.concatenate(ids)
    x, y = windows[8]  # the second shard's second window: tokens 30 + 4 .. 30 + 8
    assert x.tolist() == whole[34:38].tolist() and y.tolist() == whole[35:39].tolist()
    assert x.dtype == torch.int64
    big = write_token_folder(tmp_path / "u", {"train": [np.array([70_000, 1, 2])],
                                              "val": [np.array([3, 4, 5])]}, 70_001, 0)
    assert big.splits["train"][0].dtype == np.uint32 and big.windows("train", 2)[0][0][0] \
        == 70_000


def _folder(tmp_path: Path, vocab: int = 50) -> Path:
    write_token_folder(tmp_path / "t", {"train": [np.arange(40) % 50], "val": [np.arange(20)]},
                       vocab, 0)
    return tmp_path / "t"


@pytest.mark.parametrize("damage, fragment", [
    (lambda f: (f / "train-00000.npy").write_bytes((f / "train-00000.npy").read_bytes()[:150]),
     "train-00000.npy is truncated: 150 bytes, 208 expected"),
    (lambda f: (f / "val-00000.npy").unlink(), "val-00000.npy cannot be read as .npy"),
    (lambda f: (f / "train-00000.npy").write_bytes(b"garbage" * 20),
     "train-00000.npy cannot be read as .npy"),
    (lambda f: (f / "tokens.json").write_text("{"), "tokens.json cannot be read as JSON"),
    (lambda f: (f / "tokens.json").write_text('{"vocab_size": "50"}'),
     "'vocab_size' must be a int"),
    (lambda f: (f / "tokens.json").write_text(json.dumps(
        {"vocab_size": 50, "eot": 0, "shards": {"train": [{"file": "../x", "tokens": 1}],
                                                "val": []}})), "a file name in the folder"),
    (lambda f: (f / "tokens.json").write_text(json.dumps(
        {"vocab_size": 70_000, "eot": 0, "shards": {"train": [
            {"file": "train-00000.npy", "tokens": 40}], "val": [
            {"file": "val-00000.npy", "tokens": 20}]}})), "the manifest says 40 tokens of uint32"),
])
def test_a_damaged_token_folder_is_one_line_naming_the_file(tmp_path, damage, fragment):
    folder = _folder(tmp_path)
    damage(folder)
    with pytest.raises(LeantrainError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        open_token_folder(folder)


def test_a_token_id_past_the_vocabulary_names_the_shard_and_position(tmp_path):
    folder = open_token_folder(_folder(tmp_path))
    windows = TokenWindows(folder.splits["train"], 8, vocab_size=30)  # ids go up to 39
    windows[2]  # tokens 16..24: all below 30
    with pytest.raises(LeantrainError, match=r"train-00000\.npy holds id 32 at token 30, at or "
                                             "above the vocabulary's 30"):
        windows[3]


def test_a_corpus_is_tokenized_once_and_then_read_from_the_cache(corpus, tokenizer, caplog,
                                                                 monkeypatch):
    first = tokenized(str(corpus), str(tokenizer), 0.2)
    assert first.vocab_size == 400 and first.eot == 0
    train = np.concatenate([np.load(s.path) for s in first.splits["train"]])
    assert (train == 0).sum() == 19  # 24 files, 5 held out: one end-of-text after each
    from leantrain.data import tokenize

    monkeypatch.setattr(tokenize, "write_token_folder", None)  # a second tokenization fails
    with caplog.at_level(logging.INFO, "leantrain"):
        again = tokenized(str(corpus), str(tokenizer), 0.2)
    assert again.folder == first.folder and "(no tokenization)" in caplog.text
    (corpus / "new.txt").write_text("x = 1\n")  # other content: other shards
    try:
        with pytest.raises(TypeError):
            tokenized(str(corpus), str(tokenizer), 0.2)
    finally:
        (corpus / "new.txt").unlink()


def test_a_jsonl_corpus_packs_each_lines_text(tmp_path, tokenizer):
    lines = [{"text": f"def f{i}(x):\n    return x + {i}\n", "id": i} for i in range(50)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    folder = tokenized(str(path), str(tokenizer), 0.1)
    train = np.concatenate([np.load(s.path) for s in folder.splits["train"]])
    val = np.concatenate([np.load(s.path) for s in folder.splits["val"]])
    assert (train == 0).sum() + (val == 0).sum() == 50  # a document a line, split by position
    assert 4 <= (val == 0).sum() <= 5  # the last tenth of the bytes


@pytest.mark.parametrize("content, fragment", [
    (b'{"text": "a"}\nnot json\n', "c.jsonl line 2: not JSON"),
    (b'{"text": "a"}\n{"body": "b"}\n', "c.jsonl line 2: no text field 'text'"),
    (b'{"text": "a\xff"}\n', "c.jsonl: not UTF-8 text at byte 11"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, tokenizer, content, fragment):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(LeantrainError, match=fragment):
        tokenized(str(path), str(tokenizer), 0.1)


def test_a_tokenizer_that_cannot_be_read_is_one_line(tmp_path, corpus):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(LeantrainError, match="is not a tokenizer the tokenizers library reads"):
        tokenized(str(corpus), str(bad), 0.1)
    with pytest.raises(LeantrainError, match="is not a file; give a tokenizer.json"):
        tokenized(str(corpus), str(tmp_path / "absent"), 0.1)


TINY_GPT = ["--set", "gpt.depth=1", "--set", "gpt.width=64", "--set", "gpt.heads=2",
            "--set", "data.context=32", "--set", "data.batch_size=16", "--no-progress",
            "--set", "train.monitor_interval_s=0", "--set", "plan.compile=false"]


def _unigram_loss(folder) -> float:
    """The validation loss of the best model that ignores context: the training tokens'
    frequencies (add-one smoothed), as cross-entropy on the validation tokens."""
    train, val = (np.concatenate([np.load(s.path) for s in folder.splits[split]])
                  for split in ("train", "val"))
    counts = np.bincount(train, minlength=folder.vocab_size) + 1.0
    return float(-np.log(counts[val] / counts.sum()).mean())


def test_text_gpt_learns_on_a_tokenized_folder_below_the_unigram_loss(tmp_path, corpus,
                                                                        tokenizer, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "text-gpt", "--data", str(corpus), "--set",
                 f"data.tokenizer={tokenizer}", "--set", "train.max_steps=300", "--set",
                 "train.epochs=1", "--set", "optim.lr=0.01", "--out", str(out), *TINY_GPT]) == 0
    summary = json.loads((out / "summary.json").read_text())
    unigram = _unigram_loss(tokenized(str(corpus), str(tokenizer), 0.2))  # the run's split
    assert summary["val_loss"] < unigram - 0.2, (summary["val_loss"], unigram)


def test_a_model_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path, corpus,
                                                                        tokenizer, capsys):
    module = tmp_path / "small_lm.py"
    module.write_text("import torch\n\nclass LM(torch.nn.Module):\n    def __init__(self):\n"
                      "        super().__init__()\n        self.embed = torch.nn.Embedding(256, "
                      "16)\n        self.head = torch.nn.Linear(16, 256)\n\n"
                      "    def forward(self, x):\n        return self.head(self.embed(x))\n\n"
                      "def build():\n    return LM()\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["train", "--data", str(corpus), "--model", "small_lm:build", "--set",
                     f"data.tokenizer={tokenizer}", "--set", "data.context=16", "--out",
                     str(tmp_path / "run"), "--no-progress"])
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "the model's vocabulary (256 input embeddings) is smaller than the tokenizer" in err[0]
    assert "(400 token ids)" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_on_token_shards_resumes_mid_epoch_bit_identical(tmp_path, monkeypatch, workers):
    from conftest import snapshot_first_checkpoint

    from leantrain.config import load_config
    from leantrain.recipes import get_recipe
    from leantrain.run.fit import fit

    rng = np.random.default_rng(0)
    folder = write_token_folder(tmp_path / "t", {"train": [rng.integers(0, 64, 4000)],
                                                 "val": [rng.integers(0, 64, 600)]}, 64, 0)
    recipe = get_recipe("text-gpt")

    def run(out: Path, resume: bool = False) -> None:
        cfg = load_config(out / "config.yaml") if resume else load_config(None, [
            f"data.num_workers={workers}", "data.context=16", "data.batch_size=8",
            "gpt.depth=1", "gpt.width=32", "gpt.heads=2", "train.epochs=2",
            "train.checkpoint_every=10", "plan.compile=false", "train.monitor_interval_s=0",
            f"data.source={folder.folder}"], recipe.config | {"recipe": "text-gpt"})
        torch.manual_seed(0)
        model = recipe.build_model(64, cfg)
        fit(model, folder.windows("train", 16), folder.windows("val", 16), cfg, out,
            resume=resume, progress_bar=False)

    run(tmp_path / "full")
    snapshot = tmp_path / "snapshot"
    snapshot_first_checkpoint(monkeypatch, lambda: run(tmp_path / "other"), snapshot)
    assert torch.load(snapshot / "checkpoint.pt", weights_only=True)["progress"]["batch"] == 10
    run(snapshot, resume=True)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(snapshot / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ids_past_the_vocabulary_are_refused_when_written_and_before_training(tmp_path):
    with pytest.raises(LeantrainError, match="run from 0 to 70000; a vocabulary of 65,536"):
        write_token_folder(tmp_path / "w", {"train": [np.array([0, 70_000])],
                                            "val": [np.array([1])]}, 65_536, None)
    folder = _folder(tmp_path)  # training ids 0..39: its manifest says max_id 39
    manifest = json.loads((folder / "tokens.json").read_text())
    manifest["vocab_size"] = 30
    (folder / "tokens.json").write_text(json.dumps(manifest))
    with pytest.raises(LeantrainError, match=r"train-00000\.npy holds ids up to 39, at or above "
                                             "the vocabulary's 30"):
        open_token_folder(folder)


BAD_DATA_ARGS = ["--recipe", "text-gpt", "--set", "data.context=8", "--no-progress",
                 "--set", "train.max_steps=3"]


@pytest.mark.parametrize("kind, fragment", [
    ("truncated", "train-00000.npy is truncated"),
    ("jsonl", "c.jsonl line 3: not JSON"),
    ("field", "c.jsonl line 1: no text field 'text'"),
])
def test_bad_data_through_the_cli_is_exit_2_one_line_and_nothing_written(
        tmp_path, tokenizer, capsys, kind, fragment):
    if kind == "truncated":
        source = _folder(tmp_path)
        shard = source / "train-00000.npy"
        shard.write_bytes(shard.read_bytes()[:-10])
        more = []
    else:
        source = tmp_path / "c.jsonl"
        source.write_text('{"text": "a = 1"}\n{"text": "b = 2"}\n{"text": \n' if kind == "jsonl"
                          else '{"body": "a = 1"}\n')
        more = ["--set", f"data.tokenizer={tokenizer}"]
    out = tmp_path / "run"
    assert main(["train", "--data", str(source), "--out", str(out), *BAD_DATA_ARGS, *more]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and len(err[0]) < 300, err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_table_corpus_is_tokenized_a_document_a_row(tmp_path, tokenizer, kind):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list([{"body": f"x{i} = {i}\n", "n": i} for i in range(40)])
    if kind == "parquet":
        path = tmp_path / "c.parquet"
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    with pytest.raises(LeantrainError, match=r"no text column 'text' \(its columns: body, n\)"):
        tokenized(str(path), str(tokenizer), 0.25)
    folder = tokenized(str(path), str(tokenizer), 0.25, text_field="body")
    ends = {s: sum(int((np.load(x.path) == 0).sum()) for x in folder.splits[s])
            for s in ("train", "val")}
    assert ends == {"train": 30, "val": 10}  # a document a row, the last quarter of the rows


def test_a_stock_gpt2_with_the_tokenizers_vocabulary_trains_on_the_shards(tmp_path, corpus,
                                                                         tokenizer, capsys,
                                                                         monkeypatch):
    pytest.importorskip("transformers")
    (tmp_path / "gpt2_400.py").write_text(
        "from transformers import GPT2Config, GPT2LMHeadModel\n\n"
        "def model():\n    return GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, "
        "n_layer=1, n_head=2, n_positions=16))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--model", "gpt2_400:model", "--set",
                 f"data.tokenizer={tokenizer}", "--set", "data.context=16", "--set",
                 "train.max_steps=5", "--set", "optim.name=adamw", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["num_classes"] == 400
    assert (out / "pretrained" / "config.json").is_file()  # from_pretrained, as ever
