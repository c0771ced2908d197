"""A small decoder-only transformer (GPT) over bytes, using scaled_dot_product_attention.

Pre-norm blocks (LayerNorm → causal self-attention → residual, LayerNorm → 4x GELU MLP →
residual), learned positions, and the output projection tied to the byte embedding (fewer
parameters, and a standard regularizer for small language models). The blocks sit in one
`nn.ModuleList`, which is what activation checkpointing and FSDP2 wrap block by block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # the head width comes from the projection, not from x: heads pruned away
        # (compress --prune) leave fewer, equally wide heads on the same residual stream
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, context: int = 128, depth: int = 4, width: int = 192,
                 heads: int = 4, tie_weights: bool = True):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie_weights:
            self.head.weight = self.embed.weight
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)  # also the tied output projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, time) byte ids → (batch, time, vocab) next-byte scores."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, context: int,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample `new_tokens` bytes after `prompt` (1-D ids) from any (batch, time) → (batch,
    time, vocab) model, one at a time, seeing at most the last `context` bytes.
    Temperature 0 is greedy; `top_k` keeps only the k likeliest bytes."""
    model.eval()
    out = prompt.clone()
    for _ in range(new_tokens):
        logits = model(out[-context:].unsqueeze(0))[0, -1].float()
        if temperature <= 0:
            nxt = logits.argmax()
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[0]
        out = torch.cat([out, nxt.view(1)])
    return out


def parameters_without_embeddings(model: GPT) -> int:
    """N in the 6·N FLOPs-per-token rule: the weights every token multiplies through."""
    skip = {id(model.embed.weight), id(model.position)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
