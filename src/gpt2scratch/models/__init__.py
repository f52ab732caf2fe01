"""The seed's model modules: GELU, LayerNorm, FeedForward, MultiHeadSelfAttention, TransformerBlock, GPT."""

from gpt2scratch.models.gpt import GPT

__all__ = ["GPT"]
