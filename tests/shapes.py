"""Tiny builds of the model shapes users bring (issue 42), as `--model`/`--data` MOD:FN targets
and for the tests: Whisper, T5, a Mixtral MoE with its router aux loss, GPT-2 with PEFT LoRA,
Qwen2 with the user's own gradient checkpointing, CLIP with its contrastive loss, and a
denoiser that draws its noise inside `forward` and returns a 0-d loss (the diffusers
training-script style). Random weights from configs, generated data: no download."""

import torch
from torch import nn
from torch.utils.data import Dataset

from leantrain.data.loaders import TensorDictDataset

VOCAB = 48


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- decoder-only language models -------------------------------------------------------------

def _counting(n, seed, length=16):
    """Sequences that count up from a random start (mod VOCAB): learnable next tokens."""
    start = torch.randint(0, VOCAB, (n, 1), generator=_gen(seed))
    ids = (start + torch.arange(length)) % VOCAB
    return TensorDictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def lm_data():
    return _counting(256, 0), _counting(64, 1)


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, output_router_logits=True,
        router_aux_loss_coef=0.02, tie_word_embeddings=False))


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        output_router_logits=True, router_aux_loss_coef=0.02, decoder_sparse_step=1))


def qwen2_checkpointed():
    """Qwen2 whose user turned on gradient checkpointing with the reentrant variant."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def _gpt2(width=32):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=width,
                                      n_layer=2, n_head=4, bos_token_id=1,
                                      eos_token_id=2))


def gpt2_deep():
    """A stock GPT-2 of 4 blocks (4 pipeline stages), its head tied to its embedding, without
    dropout (whose draws differ between one process and pipeline stages)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=4,
                                      n_head=4, bos_token_id=1, eos_token_id=2, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0))


def gpt2_lora():
    """GPT-2 with a PEFT LoRA adapter on its fused attention projection (the base frozen)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                              fan_in_fan_out=True, lora_dropout=0.0))


def gpt2_lora_student():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_gpt2(24), LoraConfig(r=4, target_modules=["c_attn"],
                                                fan_in_fan_out=True))


# -- encoder-decoders -------------------------------------------------------------------------

class _Pairs(Dataset):
    """Sources of 8 tokens; each target is the source's first 4 (padded batches: fixed sizes)."""

    def __init__(self, n, seed):
        self.src = torch.randint(3, VOCAB, (n, 8), generator=_gen(seed))

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return {"input_ids": self.src[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.src[i, :4].clone()}


def seq2seq_data():
    return _Pairs(256, 0), _Pairs(64, 1)


def t5(width=32):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
        num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0))


def t5_student():
    return t5(width=24)


class _Audio(Dataset):
    """Log-mel-like features whose strongest of 4 bands names the 3 tokens to transcribe."""

    def __init__(self, n, seed):
        g = _gen(seed)
        self.band = torch.randint(0, 4, (n,), generator=g)
        self.noise = torch.randn(n, 8, 32, generator=g) * 0.1

    def __len__(self):
        return len(self.band)

    def __getitem__(self, i):
        features = self.noise[i].clone()
        b = int(self.band[i])
        features[2 * b:2 * b + 2] += 1.0
        return {"input_features": features, "labels": torch.tensor([3 + b, 7 + b, 11 + b])}


def audio_data():
    return _Audio(256, 0), _Audio(64, 1)


def whisper(width=32):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=width, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width, max_source_positions=16, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[]))


def whisper_student():
    return whisper(width=24)


# -- contrastive and diffusion ----------------------------------------------------------------

def clip():
    """CLIP returning its contrastive loss (`return_loss=True` in every batch)."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 4,
                     "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
        projection_dim=16))


def _captioned(n, seed):
    """Images whose bright quadrant is named by a 4-token caption."""
    g = _gen(seed)
    quadrant = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 3, 16, 16, generator=g) * 0.1
    for i, q in enumerate(quadrant.tolist()):
        images[i, :, 8 * (q // 2):8 * (q // 2) + 8, 8 * (q % 2):8 * (q % 2) + 8] += 1.0
    ids = torch.stack([torch.tensor([1, 5 + q, 10 + q, 2]) for q in quadrant.tolist()])
    return TensorDictDataset(input_ids=ids, pixel_values=images)


def with_loss(samples):
    """The default collation plus `return_loss=True`, so CLIP returns its contrastive loss."""
    return {**torch.utils.data.default_collate(samples), "return_loss": True}


def clip_data():
    return _captioned(256, 0), _captioned(64, 1), with_loss


class Denoiser(nn.Module):
    """Predicts the noise added to its input at a random level, drawn inside `forward`; returns
    the mean-squared error as a 0-d tensor (the diffusers training-script style)."""

    def __init__(self, width=32):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.inlet = nn.Conv2d(1, width, 3, padding=1)
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, images):
        noise = torch.randn_like(images)
        level = torch.rand(images.shape[0], 1, device=images.device)
        scale = level[:, :, None, None]
        noisy = (1 - scale).sqrt() * images + scale.sqrt() * noise
        hidden = self.inlet(noisy) + self.embed(level)[:, :, None, None]  # the level, embedded
        return ((self.net(hidden) - noise) ** 2).mean()


def denoiser():
    return Denoiser()


def _shapes(n, seed):
    g = _gen(seed)
    images = torch.zeros(n, 1, 12, 12)
    for i in range(n):
        r, c = torch.randint(0, 8, (2,), generator=g).tolist()
        images[i, 0, r:r + 4, c:c + 4] = 1.0
    return TensorDictDataset(images=images)


def image_data():
    return _shapes(256, 0), _shapes(64, 1)
