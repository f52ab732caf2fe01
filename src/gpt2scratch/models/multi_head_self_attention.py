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

ATTENTION_IMPLS = ("sdpa", "reference")


class KVCache:
    """Keys and values of one layer for incremental decoding, allocated once for `max_len` positions
    (on the first update, in the dtype the keys come in: autocast may make them bf16)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, nh, T, hs) keys/values; return all keys/values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(B, nh, self.max_len, hs)
            self.v = v.new_zeros(B, nh, self.max_len, hs)
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    # Batch surgery for a server that lets rows join and leave a running batch (gpt2scratch.serve.engine).
    # Rows are right-aligned: every row's latest token sits at position length - 1, shorter rows are left-padded.

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a (B',) index tensor), in this order."""
        if self.k is None:
            return
        for name in ("k", "v"):  # copy the positions in use, not the whole max_len buffer
            old = getattr(self, name)
            new = old.new_empty(rows.numel(), *old.shape[1:])
            new[:, :, : self.length] = old[:, :, : self.length].index_select(0, rows)
            setattr(self, name, new)

    def drop_front(self, n: int) -> None:
        """Forget the first n positions (padding that no row needs any more)."""
        if n <= 0 or self.k is None:
            return
        keep = self.length - n
        self.k[:, :, :keep] = self.k[:, :, n : self.length].clone()
        self.v[:, :, :keep] = self.v[:, :, n : self.length].clone()
        self.length = keep

    @staticmethod
    def join(first: KVCache, second: KVCache) -> KVCache:
        """The rows of `first`, then those of `second`, right-aligned in one cache: the shorter one is padded on
        the left with zeros (finite, so masked positions add exactly nothing) to the longer one's length."""
        if first.k is None or second.k is None:
            raise ValueError("cannot join an empty KV cache")
        length = max(first.length, second.length)
        joined = KVCache(max(first.max_len, second.max_len))
        B1, B2 = first.k.size(0), second.k.size(0)
        nh, hs = first.k.size(1), first.k.size(3)
        for name in ("k", "v"):
            out = first.k.new_empty(B1 + B2, nh, joined.max_len, hs)
            for rows, cache in ((slice(0, B1), first), (slice(B1, B1 + B2), second)):
                pad = length - cache.length
                out[rows, :, :pad] = 0
                out[rows, :, pad:length] = getattr(cache, name)[:, :, : cache.length]
            setattr(joined, name, out)
        joined.length = length
        return joined


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
        self.c_attn = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.emb_dim, config.emb_dim)  # residual projection: scaled init in gpt.py
        self.attn_dropout = nn.Dropout(config.drop_rate)
        self.resid_dropout = nn.Dropout(config.drop_rate)

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
        mask = None if pad_lengths is None else _padded_causal_mask(T, past, pad_lengths)
        if self.attn_impl == "sdpa":
            y = self._sdpa(q, k, v, past, mask)
        else:
            y = self._reference(q, k, v, past, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, mask: torch.Tensor | None):
        dropout_p = self.drop_rate if self.training else 0.0
        T = q.size(2)
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if T == 1:  # one new query attends to every cached key: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        # Several new queries after a cached prefix: is_causal would align the mask top-left, so pass it.
        mask = _causal_mask(T, past, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, mask: torch.Tensor | None):
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, past + T)
        mask = _causal_mask(T, past, q.device) if mask is None else mask
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v  # (B, nh, T, hs)


def _causal_mask(T: int, past: int, device) -> torch.Tensor:
    """(T, past + T) booleans: query i (at position past + i) may see keys 0 .. past + i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


def _padded_causal_mask(T: int, past: int, pad_lengths: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, past + T): causal, and no query sees its row's left padding. A padding position may see itself,
    so that no softmax row is empty (its output is never used)."""
    keys = torch.arange(past + T, device=pad_lengths.device)  # (past + T,)
    queries = keys[past:, None]  # (T, 1): absolute positions of the new tokens
    visible = (keys[None, :] <= queries) & (keys[None, None, :] >= pad_lengths[:, None, None])  # (B, T, past + T)
    return (visible | (keys[None, :] == queries)).unsqueeze(1)
