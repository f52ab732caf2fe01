"""The key/value cache of one attention layer, for incremental decoding.

`update` is all that generation needs. The batch surgery below it (keep_rows, drop_front, join) lets a server
add rows to, and drop rows from, a batch that is being decoded (gpt2scratch.serve.engine).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one layer for incremental decoding, allocated once for `max_len` positions
    (on the first update, in the dtype the keys come in: autocast may make them bf16). The positions past
    `length` are left as allocated, not zeroed: nothing reads them (but see clear_unused), and zeroing a batch's
    buffers (16 rows of GPT-2 124M: 1.2 GB) took longer than the forward pass over its prompts."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None  # (B, nh, max_len, hs): the first B rows of buffers[0]
        self.v: torch.Tensor | None = None
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # as allocated (keep_rows may use fewer rows)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, nh, T, hs) keys/values; return all keys/values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self._hold(k.new_empty(B, nh, self.max_len, hs), v.new_empty(B, nh, self.max_len, hs))
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _hold(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.buffers = (k, v)
        self.k, self.v = k, v

    def clear_unused(self) -> None:
        """Zero the positions past `length`, for a step that reads the whole buffer under a mask (the CUDA graphs'
        static_decoding_step): a masked position's weight is 0, and 0 x NaN is NaN, so they must hold finite
        numbers."""
        if self.k is not None:
            self.k[:, :, self.length :].zero_()
            self.v[:, :, self.length :].zero_()

    # Batch surgery for a server that lets rows join and leave a running batch (gpt2scratch.serve.engine).
    # Rows are right-aligned: every row's latest token sits at position length - 1, shorter rows are left-padded.

    @staticmethod
    def fill_order(keep: list[int]) -> list[int]:
        """The rows `keep` (ascending) in the order that keep_rows moves least: each stays where it is, except rows
        from the end, which take the places of the rows that leave."""
        count, kept = len(keep), set(keep)
        order = list(range(count))
        holes = [i for i in range(count) if i not in kept]
        for hole, row in zip(holes, [i for i in keep if i >= count], strict=True):
            order[hole] = row
        return order

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a (B',) index tensor), in this order. In an order from fill_order only the
        rows that move are copied, within the buffers (a row leaving a batch of 16 GPT-2 124M rows at 500
        positions: 141 ms for a copy of them all, the batch's cost of two decoding steps); any other order copies
        every row into new buffers."""
        if self.k is None:
            return
        order = rows.tolist()
        if all(row == place or row >= len(order) for place, row in enumerate(order)):  # no copy overwrites a source
            for place, row in enumerate(order):
                if row != place:
                    self.k[place, :, : self.length] = self.k[row, :, : self.length]
                    self.v[place, :, : self.length] = self.v[row, :, : self.length]
            self.k, self.v = self.k[: len(order)], self.v[: len(order)]
            return
        kept = []
        for old in (self.k, self.v):  # copy the positions in use, not the whole max_len buffer
            new = old.new_empty(rows.numel(), *old.shape[1:])
            new[:, :, : self.length] = old[:, :, : self.length].index_select(0, rows)
            kept.append(new)
        self._hold(*kept)

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
        the left with zeros (finite, so masked positions add exactly nothing) to the longer one's length. Where
        `first`'s buffers have room for `second`'s rows (rows that left: keep_rows) and `second` is no longer than
        `first`, they go there and `first` is returned, its rows not copied; otherwise both are copied into a new
        cache."""
        if first.k is None or second.k is None:
            raise ValueError("cannot join an empty KV cache")
        B1, B2 = first.k.size(0), second.k.size(0)
        room = first.buffers[0].size(0) - B1
        if room >= B2 and second.length <= first.length and second.k.dtype == first.k.dtype:
            pad = first.length - second.length
            for buffer, rows in zip(first.buffers, (second.k, second.v), strict=True):
                buffer[B1 : B1 + B2, :, :pad].zero_()
                buffer[B1 : B1 + B2, :, pad : first.length] = rows[:, :, : second.length]
            first.k, first.v = (buffer[: B1 + B2] for buffer in first.buffers)
            return first
        length = max(first.length, second.length)
        joined = KVCache(max(first.max_len, second.max_len))
        nh, hs = first.k.size(1), first.k.size(3)
        out = []
        for name in ("k", "v"):
            buffer = first.k.new_empty(B1 + B2, nh, joined.max_len, hs)
            for rows, cache in ((slice(0, B1), first), (slice(B1, B1 + B2), second)):
                pad = length - cache.length
                buffer[rows, :, :pad].zero_()
                buffer[rows, :, pad:length] = getattr(cache, name)[:, :, : cache.length]
            out.append(buffer)
        joined._hold(*out)
        joined.length = length
        return joined
