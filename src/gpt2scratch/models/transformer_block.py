"""A GPT-2 block: pre-LayerNorm attention and MLP, each added to the residual stream."""

import torch
from torch import nn

from gpt2scratch.config import GPTConfig
from gpt2scratch.models.feed_forward import FeedForward
from gpt2scratch.models.kv_cache import KVCache
from gpt2scratch.models.layer_norm import LayerNorm
from gpt2scratch.models.multi_head_self_attention import MultiHeadSelfAttention


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.ln_1 = LayerNorm(config.emb_dim)
        self.attn = MultiHeadSelfAttention(config, attn_impl=attn_impl)
        self.ln_2 = LayerNorm(config.emb_dim)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pad_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Pre-LN (GPT-2): normalise the input of each sub-layer, not the residual stream itself.
        x = x + self.attn(self.ln_1(x), cache=cache, pad_lengths=pad_lengths)
        x = x + self.mlp(self.ln_2(x))
        return x
