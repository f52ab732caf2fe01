"""Causal multi-head self-attention, with two paths that agree to fp32 tolerance.

- "reference": the computation written out, softmax(q k^T / sqrt(hs)) v with an explicit causal mask
  (`masked_fill`, as the seed asks). Readable, materialises the (T, T) scores.
- "sdpa": `torch.nn.functional.scaled_dot_product_attention`, which dispatches to flash / memory-efficient
  kernels where the device has them. The default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2scratch.config import GPTConfig
from gpt2scratch.models.cpu_attention import causal_attention
from gpt2scratch.models.dropout import Dropout, causal_attention_with_dropout, uses_fast_mask
from gpt2scratch.models.kv_cache import KVCache
from gpt2scratch.models.linear import Linear

ATTENTION_IMPLS = ("sdpa", "reference")


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl ({attn_impl!r}) must be one of {ATTENTION_IMPLS}")
        self.attn_impl = attn_impl
        self.n_heads = config.n_heads
        self.emb_dim = config.emb_dim
        self.drop_rate = config.drop_rate
        # q, k and v in one matmul; GPT-2 names (attn.c_attn, attn.c_proj) so HF interop is a transpose.
        self.c_attn = Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = Linear(config.emb_dim, config.emb_dim)  # residual projection: scaled init in gpt.py
        self.attn_dropout = Dropout(config.drop_rate)
        self.resid_dropout = Dropout(config.drop_rate)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, pad_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). pad_lengths (B,): rows left-padded by that many tokens, which no query sees."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.emb_dim, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)  # (B, nh, past + T, hs)
        if self.attn_impl == "sdpa":
            y = self._sdpa(q, k, v, past, pad_lengths)
        else:
            y = self._reference(q, k, v, past, pad_lengths)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, pad_lengths: torch.Tensor | None):
        dropout_p = self.drop_rate if self.training else 0.0
        T = q.size(2)
        if pad_lengths is None and past == 0:  # plain causal attention: the flash / memory-efficient kernels
            if uses_fast_mask(q, dropout_p, self.training):  # a CPU's flash kernel has no dropout
                return causal_attention_with_dropout(q, k, v, dropout_p)
            if dropout_p == 0.0:  # training on a CPU: the flash kernel or the scores written out, as timed
                return causal_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if T == 1 and torch.compiler.is_compiling() and dropout_p == 0.0:
            return one_query_attention(q, k, v, pad_lengths)
        if pad_lengths is None and T == 1:  # one new query attends to every cached key: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # Several new queries after a cached prefix (is_causal would align the mask top-left), or padding.
        mask = causal_mask(T, past, q.device, pad_lengths)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _reference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, pad_lengths: torch.Tensor | None
    ):
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, past + T)
        att = att.masked_fill(~causal_mask(T, past, q.device, pad_lengths), float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_lengths: torch.Tensor | None):
    """Attention of one new query (B, nh, 1, hs) per row to all its cached keys, written out: what a compiled
    decoding step runs. Inductor fuses it into one kernel per layer, where the flash kernel costs about 70 us a
    layer on a CPU for a single query. (The softmax is written out too, normalised after the product with v:
    written as softmax then matmul, inductor's pattern matcher would turn it back into the flash kernel.)"""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, 1, L)
    if pad_lengths is not None:  # the row's left padding is hidden (its own position never is padding)
        keys = torch.arange(k.size(2), device=q.device)
        att = att.masked_fill((keys[None, :] < pad_lengths[:, None])[:, None, None, :], float("-inf"))
    weights = (att - att.amax(dim=-1, keepdim=True)).exp()
    return (weights @ v) / weights.sum(dim=-1, keepdim=True)


def causal_mask(T: int, past: int, device, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each of T new queries may see, after `past` cached positions: query i (at position past + i)
    sees keys 0 .. past + i. (T, past + T) booleans; with pad_lengths (B,) also no key of its row's left padding,
    as (B, 1, T, past + T). A padding position may see itself, so that no softmax row is empty (its output is
    never used)."""
    keys = torch.arange(past + T, device=device)  # (past + T,)
    queries = keys[past:, None]  # (T, 1): absolute positions of the new tokens
    visible = keys[None, :] <= queries  # (T, past + T)
    if pad_lengths is None:
        return visible
    visible = visible & (keys[None, None, :] >= pad_lengths[:, None, None])  # (B, T, past + T)
    return (visible | (keys[None, :] == queries)).unsqueeze(1)
