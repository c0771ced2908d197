"""Structured pruning of stock Hugging Face transformers: whole heads and MLP channels go,
the attention modules stay consistent, the pruned model runs, saves, reloads and fine-tunes."""

import re

import pytest
import torch
from torch.utils.data import Dataset

from leantrain import fit, load_config
from leantrain.compress import attention
from leantrain.compress.prune import load_pruned, prune_channels, save_pruned
from leantrain.errors import LeantrainError
from leantrain.measure.flops import count_flops

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 12


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _inputs(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g)}


def _macs(model) -> int:
    with torch.no_grad():
        return count_flops(lambda: model(**_inputs())) // 2


def _check_heads(model, expected_heads: int | None = None) -> int:
    """Every attention module's head count agrees with its projections' shapes; returns the
    fewest heads left."""
    found = attention.find(model)
    assert found
    for a in found:
        heads = attention.heads_of(a)
        assert expected_heads is None or heads == expected_heads, (a.name, heads)
        m = a.module
        if a.fused:
            assert m.c_attn.out_features == 3 * heads * m.head_dim
            assert m.c_proj.in_features == heads * m.head_dim
        else:
            for p in a.projections:
                assert p.out_features == heads * m.attention_head_size == m.all_head_size
            # the output projection (in BertSelfOutput) takes what the heads give
            parent = dict(model.named_modules())[a.name.rsplit(".", 1)[0]]
            assert parent.output.dense.in_features == m.all_head_size
    return min(attention.heads_of(a) for a in found)


def test_conv1d_becomes_an_equal_linear():
    model = gpt2()
    before = model(**_inputs()).logits
    assert attention.conv1d_to_linear(model) == 2 * 4  # c_attn, c_proj, c_fc, c_proj per block
    torch.testing.assert_close(model(**_inputs()).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_bert_heads_and_mlp_channels_are_pruned_consistently(ratio, tmp_path):
    model = bert()
    macs = _macs(model)
    prune_channels(model, _inputs(), ratio)
    heads = _check_heads(model)
    assert 1 <= heads < 4  # whole heads removed (of 4)
    logits = model(**_inputs()).logits  # it runs
    assert logits.shape[-1] == 3
    if ratio == 0.5:
        assert macs / _macs(model) >= 1.5
    save_pruned(model, tmp_path / "pruned.pt")
    again = load_pruned(bert(), tmp_path / "pruned.pt")
    _check_heads(again, heads)
    torch.testing.assert_close(again(**_inputs()).logits, logits)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_gpt2_heads_and_mlp_channels_are_pruned_consistently(ratio, tmp_path):
    model = gpt2()
    macs = _macs(model)
    prune_channels(model, _inputs(), ratio)
    assert _check_heads(model, 2) == 2  # ceil(ratio x 4) of 4 heads removed, as Torch-Pruning
    for block in model.transformer.h:
        assert block.mlp.c_fc.out_features == block.mlp.c_proj.in_features < 128
        assert block.attn.split_size == 2 * block.attn.head_dim  # q, k, v each two heads wide
    logits = model(**_inputs()).logits
    assert logits.shape[-1] == VOCAB
    if ratio == 0.5:
        assert macs / _macs(model) >= 1.5
    save_pruned(model, tmp_path / "pruned.pt")
    again = load_pruned(gpt2(), tmp_path / "pruned.pt")
    _check_heads(again, 2)
    torch.testing.assert_close(again(**_inputs()).logits, logits)


def test_the_weakest_fused_heads_go_and_the_kept_ones_compute_as_before():
    """Zero head 1's q/k/v rows: it is the one removed, and the others are untouched, so a
    model whose head 1 contributed nothing gives the same logits after pruning."""
    model = gpt2()
    attention.conv1d_to_linear(model)
    for block in model.transformer.h:
        attn = block.attn
        with torch.no_grad():
            for part in range(3):
                rows = slice(part * 32 + 8, part * 32 + 16)  # head 1 of 4 (head_dim 8)
                attn.c_attn.weight[rows] = 0
                attn.c_attn.bias[rows] = 0
            attn.c_proj.weight[:, 8:16] = 0
    before = model(**_inputs()).logits
    for a in attention.find(model):
        assert attention.prune_fused_heads(a, 0.25) == 3
    torch.testing.assert_close(model(**_inputs()).logits, before, rtol=1e-5, atol=1e-5)


def test_the_text_gpt_recipe_is_pruned_by_heads_and_reloads(tmp_path):
    from leantrain.recipes.gpt import GPT
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, context=SEQ, depth=2, width=32, heads=4).eval()
    tokens = _inputs()["input_ids"]
    macs = count_flops(lambda: model(tokens)) // 2
    prune_channels(model, tokens, 0.5)
    for block in model.blocks:
        assert block.attention.heads == 2 and block.attention.qkv.out_features == 3 * 2 * 8
        assert block.attention.proj.in_features == 2 * 8
        assert block.mlp[0].out_features == block.mlp[2].in_features == 64
    logits = model(tokens)
    assert logits.shape == (2, SEQ, VOCAB)
    assert macs / (count_flops(lambda: model(tokens)) // 2) >= 1.5
    save_pruned(model, tmp_path / "gpt.pt")
    again = load_pruned(GPT(vocab=VOCAB, context=SEQ, depth=2, width=32, heads=4).eval(),
                        tmp_path / "gpt.pt")
    torch.testing.assert_close(again(tokens), logits)


def test_pruning_every_fused_head_is_refused():
    model = gpt2()
    attention.conv1d_to_linear(model)
    with pytest.raises(LeantrainError, match="removed every head of transformer.h.0.attn"):
        attention.prune_fused_heads(attention.find(model)[0], 0.99)


def test_a_stock_vit_is_pruned_by_heads_and_reloads(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3,
                                    hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        macs = count_flops(lambda: model(pixel_values=pixels)) // 2
    prune_channels(model, {"pixel_values": pixels}, 0.5)
    for a in attention.find(model):
        assert attention.heads_of(a) == 2
        module = a.module
        assert module.q_proj.out_features == module.v_proj.out_features == 2 * module.head_dim
        assert module.o_proj.in_features == 2 * module.head_dim
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        assert macs / (count_flops(lambda: model(pixel_values=pixels)) // 2) >= 1.5
    save_pruned(model, tmp_path / "vit.pt")
    again = load_pruned(transformers.ViTForImageClassification(config).eval(),
                        tmp_path / "vit.pt")
    torch.testing.assert_close(again(pixel_values=pixels).logits, logits)


class _Tokens(Dataset):
    """Token rows with a class label (BERT) or themselves as labels (a causal LM)."""

    def __init__(self, n: int = 64, lm: bool = False):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids if lm else self.ids[:, 0] % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
def test_a_pruned_transformer_fine_tunes_with_the_trainer(build):
    model = build()
    prune_channels(model, _inputs(), 0.5)
    cfg = load_config(None, ["plan.device=cpu", "data.batch_size=16", "train.epochs=1",
                             "optim.name=adamw", "optim.lr=1e-3", "train.monitor_interval_s=0"])
    lm = build is gpt2
    summary = fit(model, _Tokens(lm=lm), _Tokens(32, lm=lm), cfg, progress_bar=False)
    assert summary["steps"] == 4 and summary["val_loss"] == summary["val_loss"]  # finite


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_a_ratio_out_of_range_is_refused(ratio):
    with pytest.raises(LeantrainError, match="pruning ratio must be in"):
        prune_channels(bert(), _inputs(), ratio)


def test_int8_on_gpt2_quantizes_its_conv1d_and_keeps_the_tied_head():
    from leantrain.compress.quantize import quantize_linear, state_bytes
    model = gpt2()
    params, size = sum(p.numel() for p in model.parameters()), state_bytes(model)
    reference = model(**_inputs()).logits
    quantize_linear(model, "int8-weight-only")
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert sum(p.numel() for p in model.parameters()) <= params
    assert state_bytes(model) < 0.8 * size  # the blocks' weights are int8 now
    assert (model(**_inputs()).logits - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.slow
def test_compress_prunes_a_stock_bert_from_the_cli_and_the_result_reloads(tmp_path,
                                                                          monkeypatch):
    import json
    from pathlib import Path

    from leantrain.cli import main
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    import hf_sequence_classification as example
    hf = ["--model", "hf_sequence_classification:model", "--data",
          "hf_sequence_classification:data", "--set", "optim.name=adamw", "--set",
          "optim.lr=3e-3", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", *hf, "--epochs", "2", "--out", str(run)]) == 0
    out = tmp_path / "small"
    assert main(["compress", *hf, "--checkpoint", str(run), "--prune", "0.5", "--keep-harmful",
                 "--finetune-epochs", "1", "--finetune-lr", "1e-3", "--out", str(out)]) == 0
    before, after = json.loads((out / "report.json").read_text())["stages"]
    assert before["macs"] / after["macs"] >= 1.5
    assert after["verdict"] in ("keep", "not worth it", "harmful")
    model = load_pruned(example.model(), out / "model.pt").eval()
    heads = {attention.heads_of(a) for a in attention.find(model)}
    original = {attention.heads_of(a) for a in attention.find(example.model())}
    assert max(heads) < max(original)
    batch = example.pad([example.data()[1][i] for i in range(4)])
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape[0] == 4


# ------------------------------------------------------------------ refused, not broken


def _gqa_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))


def _distilbert():
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
        max_position_embeddings=32))


def _bart():
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=20, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=32))


@pytest.mark.parametrize("build, fragment", [
    (_gqa_llama, "grouped-query attention (2 query heads per key/value head)"),
    (_distilbert, "DistilBertSelfAttention): an attention layout not known"),
])
def test_an_attention_layout_it_cannot_keep_consistent_is_refused_before_tracing(build,
                                                                               fragment):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LeantrainError, match=re.escape(fragment)) as err:
        prune_channels(model.eval(), {"input_ids": torch.ones(1, 8, dtype=torch.long)}, 0.5)
    assert len(str(err.value).splitlines()) == 1
    after = model.state_dict()  # refused before any layer was touched
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_encoder_decoders_self_and_cross_attention_heads_are_pruned_and_reload(tmp_path):
    """BART's attention modules keep `num_heads` and `head_dim` (transformers 5 reshapes by -1
    heads); its cross-attention's keys and values come from the encoder."""
    model = _bart().eval()
    ids = torch.randint(3, 20, (2, 8), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "labels": ids[:, :4].clone()}
    with torch.no_grad():
        before = count_flops(lambda: model(**batch))
    prune_channels(model, batch, 0.5)
    found = attention.find(model)
    assert len(found) == 3 and all(attention.heads_of(a) == 1 for a in found)  # 2 -> 1 each
    assert all(a.module.num_heads == 1 for a in found)
    with torch.no_grad():
        assert count_flops(lambda: model(**batch)) < 0.6 * before
        loss = model(**batch).loss
    save_pruned(model, tmp_path / "bart.pt")
    again = load_pruned(_bart().eval(), tmp_path / "bart.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).loss, loss)


def test_a_pruning_that_cuts_the_residual_stream_or_unties_weights_is_refused():
    from leantrain.compress.prune import _check_interface, _interface

    model = gpt2()
    interface = _interface(model)
    assert ["transformer.wte.weight", "lm_head.weight"] in interface[1]  # tied
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(LeantrainError, match="untied transformer.wte.weight and lm_head"):
        _check_interface(model, interface)
    model = gpt2()
    interface = _interface(model)
    model.transformer.ln_f.weight = torch.nn.Parameter(torch.ones(16))
    with pytest.raises(LeantrainError, match=r"residual stream at transformer.ln_f \(\(32,\)"):
        _check_interface(model, interface)
