"""Token shards on disk (format: shards.py) -> (x, y) training windows: exact, resumable, rank-aware.

Order of training windows: split `train` is cut into windows of context_length + 1 tokens (x = window[:-1],
y = window[1:]); each epoch shifts the window grid by a seeded offset and visits the windows in a seeded
permutation. A global micro-batch is the next `world_size * batch_size` windows of that order; rank r takes
its r-th slice. So N processes see exactly the windows one process sees at the same global batch, and the
position in the order (`state_dict()`) is all that a resumed run needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2scratch.config import IGNORE_INDEX
from gpt2scratch.dataset.shards import DataError, read_manifest, read_shard


class TokenSplit:
    """One split's shards as one read-only token sequence."""

    def __init__(self, data_dir: str | Path, split: str):
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{data_dir} has no '{split}' split; re-run `gpt2scratch prepare`")
        info = manifest["splits"][split]
        self.shards = [read_shard(Path(data_dir) / name) for name in info["shards"]]
        self.offsets = np.cumsum([0] + [len(shard) for shard in self.shards])
        self.n_tokens = int(self.offsets[-1])
        if self.n_tokens != info["tokens"]:
            raise DataError(
                f"{data_dir}: the '{split}' shards hold {self.n_tokens} tokens but the manifest says "
                f"{info['tokens']}; re-run `gpt2scratch prepare`"
            )
        self.n_bytes = int(info["bytes"])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries, as int64."""
        pieces = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            begin = start - int(self.offsets[shard])
            piece = self.shards[shard][begin : begin + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces).astype(np.int64)


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # windows of this epoch's order already consumed, by all ranks together


class TrainLoader:
    """Endless (x, y) micro-batches of `batch_size` windows for one rank; see the module docstring for the order."""

    def __init__(
        self,
        split: TokenSplit,
        context_length: int,
        batch_size: int,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        self.split, self.T, self.B = split, context_length, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        if (len(split) - 1) // context_length < 1:
            raise DataError(
                f"the train split has {len(split)} tokens, fewer than one context window ({context_length + 1}); "
                "use a larger corpus or a smaller context_length"
            )
        if self._windows_in_epoch(0) < self.global_batch:
            raise DataError(
                f"the train split has {self._windows_in_epoch(0)} windows of {context_length} tokens, fewer than one "
                f"global micro-batch ({batch_size} x {world_size} ranks); use a smaller batch_size or context_length"
            )
        self.state = LoaderState()
        self._order_epoch, self._order, self._offset = -1, np.empty(0, dtype=np.int64), 0

    def _epoch_rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _windows_in_epoch(self, offset: int) -> int:
        return (len(self.split) - 1 - offset) // self.T

    def _ensure_order(self) -> None:
        if self._order_epoch == self.state.epoch:
            return
        rng = self._epoch_rng(self.state.epoch)
        # Shift the window grid each epoch (epoch 0 starts at token 0), unless that would lose the last window.
        offset = int(rng.integers(0, self.T)) if self.state.epoch > 0 else 0
        if self._windows_in_epoch(offset) < self._windows_in_epoch(0):
            offset = 0
        self._offset = offset
        self._order = rng.permutation(self._windows_in_epoch(offset))
        self._order_epoch = self.state.epoch

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), each (batch_size, context_length) int64: this rank's part of the next global micro-batch."""
        self._ensure_order()
        if self.state.position + self.global_batch > len(self._order):  # drop the epoch's remainder
            self.state = LoaderState(epoch=self.state.epoch + 1, position=0)
            self._ensure_order()
        first = self.state.position + self.rank * self.B
        windows = self._order[first : first + self.B]
        self.state.position += self.global_batch
        batch = np.stack([self.split.read(self._offset + int(w) * self.T, self.T + 1) for w in windows])
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        try:
            seed, epoch, position = state["seed"], int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"loader state {state!r} is not {{epoch, position, seed}}") from None
        if seed != self.seed:
            raise ValueError(f"loader state was saved with seed {seed}, this loader has seed {self.seed}")
        self.state = LoaderState(epoch=epoch, position=position)


def val_batches(
    split: TokenSplit,
    context_length: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
):
    """Every full window of the val split once (or those in the first max_tokens), in order, rank-strided.

    Yields (x, y) of batch_size rows (fewer in the last batch). Every rank gets the same number of batches (FSDP
    needs that); a rank with one window fewer gets a padding row whose targets are all IGNORE_INDEX, so the
    windows evaluated, and the loss, are the same for any number of ranks. A split shorter than one window
    still gives one (shorter) window, so a small val split is never skipped.
    """
    T = min(context_length, len(split) - 1)
    if T < 1:
        raise DataError("the val split has fewer than 2 tokens; re-run `gpt2scratch prepare` with more text")
    n_windows = (len(split) - 1) // T
    if max_tokens:
        n_windows = min(n_windows, max(1, max_tokens // T))
    per_rank = -(-n_windows // world_size)  # ceil
    windows = list(range(rank, n_windows, world_size))
    windows += [None] * (per_rank - len(windows))
    for i in range(0, per_rank, batch_size):
        rows = [
            split.read(w * T, T + 1) if w is not None else np.full(T + 1, IGNORE_INDEX, dtype=np.int64)
            for w in windows[i : i + batch_size]
        ]
        batch = np.stack(rows)
        x = np.where(batch[:, :-1] == IGNORE_INDEX, 0, batch[:, :-1])
        yield x, batch[:, 1:]
