"""Corpus preparation (`gpt2scratch prepare`): any text -> token shards + manifest.json; and `DataModule`, what the
trainer opens a prepared folder with.

    gpt2scratch prepare --out data/shakespeare            # the embedded corpus (Shakespeare), offline
    gpt2scratch prepare my_texts/ notes.txt --out data/mine
    gpt2scratch prepare HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out data/fineweb   # online

Sources are read into documents (sources.py); their pieces are tokenised by a pool of processes, results are
taken back in order, and each document goes whole to the train or val split by a seeded draw, starting with
<|endoftext|>. Shards and manifest are written in the format of shards.py.

Everything is written to a hidden temporary folder and moved into place at the end, manifest last: a
killed run leaves nothing that a later run (or the trainer) takes for complete.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2scratch.dataset.dataset import TokenSplit, TrainLoader, val_batches
from gpt2scratch.dataset.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKEN_DTYPE,
    DataError,
    ShardWriter,
    existing_manifest,
    read_manifest,
    write_manifest,
)
from gpt2scratch.dataset.sources import Reader, Source, find_sources
from gpt2scratch.dataset.tokenizer import Tokenizer, file_sha256, train_bpe
from gpt2scratch.options import MAX_SHARD_VOCAB, PrepareOptions

log = logging.getLogger(__name__)

TASK_CHARS = 1 << 20  # about this much text per tokenisation task
TOKENIZER_SAMPLE_CHARS = 256 << 20  # `--tokenizer bpe:N` learns its merges from at most this much text


# ----------------------------------------------------------------------------------------------------------------------
# Tokenisation: in the process itself (workers=1) or in a pool, each worker with its own tokenizer.


def _encode(tokenizer: Tokenizer, pieces: list[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode_ordinary(piece), dtype=TOKEN_DTYPE) for piece in pieces]


_worker_tokenizer: Tokenizer | None = None  # set in each pool worker by _init_worker


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_dir)


def _encode_in_worker(pieces: list[str]) -> list[np.ndarray]:
    return _encode(_worker_tokenizer, pieces)


# ----------------------------------------------------------------------------------------------------------------------
# prepare


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    reused: bool
    seconds: float


def prepare(inputs: list[str], out_dir: str | Path, options: PrepareOptions | None = None) -> PrepareResult:
    """Tokenise `inputs` (the embedded Shakespeare corpus if empty) into shards in `out_dir`."""
    from gpt2scratch import __version__

    options = options or PrepareOptions()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    sources = find_sources(inputs)
    request = {
        "sources": [source.describe(options) for source in sources],
        **{f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.metadata.get("manifest")},
    }
    existing = existing_manifest(out_dir)
    if existing is not None and existing.get("request") == request and existing.get("format_version") == FORMAT_VERSION:
        log.info(f"{out_dir} is up to date with these inputs and settings; reusing it")
        return PrepareResult(out_dir, existing, True, time.perf_counter() - started)
    if existing is not None:
        log.info(f"{out_dir} was prepared from other inputs or settings; rebuilding it")

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".partial-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    work = out_dir / f".partial-{os.getpid()}"
    work.mkdir()
    try:
        manifest = _prepare_into(work, sources, options, request)
        manifest["package_version"] = __version__
        _publish(work, out_dir, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(out_dir, manifest, False, time.perf_counter() - started)


def _prepare_into(work: Path, sources: list[Source], options: PrepareOptions, request: dict) -> dict:
    tokenizer_dir = work / "tokenizer"
    if options.tokenizer == "gpt2":
        Tokenizer.gpt2().save(tokenizer_dir)
    else:
        texts = Reader(options).texts(sources, TOKENIZER_SAMPLE_CHARS)
        train_bpe(texts, options.bpe_vocab_size, tokenizer_dir, options.progress)
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > MAX_SHARD_VOCAB:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens; ids beyond {MAX_SHARD_VOCAB - 1} "
            "do not fit uint16 shards"
        )

    writers = {split: ShardWriter(work, split, options.shard_tokens) for split in SPLITS}
    reader = Reader(options)
    draw = random.Random(options.seed)
    eot = np.array([tokenizer.eot_id], dtype=TOKEN_DTYPE)
    total_bytes = sum(source.size for source in sources) or None
    bar = _progress(total_bytes, options.progress)
    n_tokens = 0

    def pieces() -> Iterator[tuple[str, str, bool]]:
        """(split, text, starts a document) for every piece of every document, in order."""
        for source in sources:
            for document in reader.documents(source):
                split = "val" if draw.random() < options.val_fraction else "train"
                first = True
                for piece in document:
                    yield split, piece, first
                    first = False
                if first:  # an empty document still separates
                    yield split, "", True

    def tasks() -> Iterator[list[tuple[str, str, bool]]]:
        batch, chars = [], 0
        for item in pieces():
            batch.append(item)
            chars += len(item[1])
            if chars >= TASK_CHARS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    def consume(batch: list[tuple[str, str, bool]], results: list[np.ndarray]) -> None:
        nonlocal n_tokens
        for (split, text, starts), tokens in zip(batch, results, strict=True):
            writer = writers[split]
            if starts:
                writer.write(eot)
                writer.documents += 1
                n_tokens += 1
            writer.write(tokens)
            writer.bytes += len(text.encode("utf-8"))
            n_tokens += len(tokens)
        bar.update(reader.bytes_read - bar.n)
        bar.set_postfix_str(
            f"docs={writers['train'].documents + writers['val'].documents:,} "
            f"tokens/s={n_tokens / max(1e-9, bar.format_dict['elapsed']):,.0f}",
            refresh=False,
        )

    try:
        if options.workers == 1:
            for batch in tasks():
                consume(batch, _encode(tokenizer, [text for _, text, _ in batch]))
        else:
            with ProcessPoolExecutor(options.workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
                pending: deque = deque()
                for batch in tasks():
                    pending.append((batch, pool.submit(_encode_in_worker, [text for _, text, _ in batch])))
                    if len(pending) >= 2 * options.workers:  # bounded: at most this many tasks in flight
                        done_batch, future = pending.popleft()
                        consume(done_batch, future.result())
                while pending:
                    done_batch, future = pending.popleft()
                    consume(done_batch, future.result())
    finally:
        bar.close()
    for writer in writers.values():
        writer.finish()

    train, val = writers["train"], writers["val"]
    if train.tokens + val.tokens == 0 or train.bytes + val.bytes == 0:
        raise DataError("the inputs hold no text (empty files or records); nothing to prepare")
    if val.tokens == 0 or train.tokens == 0:
        _rebalance(train if val.tokens == 0 else val, val if val.tokens == 0 else train, options, tokenizer)
    if reader.replaced:
        log.warning(f"replaced {reader.replaced:,} invalid UTF-8 sequence(s) with U+FFFD (--encoding-errors replace)")

    return {
        "format": "gpt2scratch-token-shards",
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "path": "tokenizer",
            "sha256": {name: file_sha256(tokenizer_dir / name) for name in ("vocab.json", "merges.txt")},
        },
        "dtype": "uint16",
        "splits": {name: writer.manifest_entry() for name, writer in writers.items()},
        "replaced_characters": reader.replaced,
        "request": request,
    }


def _rebalance(full: ShardWriter, empty: ShardWriter, options: PrepareOptions, tokenizer: Tokenizer) -> None:
    """No document was drawn for one split (e.g. a single input file): move the tail of the other one into it."""
    share = options.val_fraction if empty.split == "val" else 1 - options.val_fraction
    count = max(2, math.ceil(full.tokens * share))
    if full.tokens - count < 2:
        raise DataError(
            f"the inputs give only {full.tokens} tokens, too few to split into train and val; add more text"
        )
    log.info(f"no document fell in the {empty.split} split; moving the last {count:,} tokens of {full.split} there")
    tail = full.take_tail(count)
    text_bytes = len(tokenizer.decode_bytes(tail[tail != tokenizer.eot_id]))
    full.bytes -= text_bytes
    empty.bytes += text_bytes
    empty.write(tail)
    empty.documents += 1
    empty.finish()


def _publish(work: Path, out_dir: Path, manifest: dict) -> None:
    """Move the finished files into `out_dir`, replacing an older preparation; the manifest goes last."""
    old = existing_manifest(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here on, the folder is not a finished preparation
    if old is not None:
        for split in old.get("splits", {}).values():
            for name in split.get("shards", []):
                (out_dir / name).unlink(missing_ok=True)
    for split in manifest["splits"].values():
        for name in split["shards"]:
            os.replace(work / name, out_dir / name)
    if (out_dir / "tokenizer").exists():
        shutil.rmtree(out_dir / "tokenizer")
    os.replace(work / "tokenizer", out_dir / "tokenizer")
    write_manifest(out_dir, manifest)


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------------
# A prepared folder, opened for training.


class DataModule:
    """A prepared data folder, with what the trainer needs to read it (context, batch, ranks, seed)."""

    def __init__(
        self,
        data_dir: str | Path,
        context_length: int,
        batch_size: int,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.context_length, self.batch_size = context_length, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.train = TokenSplit(self.data_dir, "train")
        self.val = TokenSplit(self.data_dir, "val")

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def tokenizer_dir(self) -> Path:
        """Folder of the tokenizer the shards were made with (vocab.json + merges.txt)."""
        return self.data_dir / self.manifest["tokenizer"]["path"]

    def train_loader(self) -> TrainLoader:
        return TrainLoader(self.train, self.context_length, self.batch_size, self.seed, self.rank, self.world_size)

    def val_batches(self, batch_size: int | None = None, max_tokens: int | None = None):
        batch_size = batch_size or self.batch_size
        return val_batches(self.val, self.context_length, batch_size, self.rank, self.world_size, max_tokens)
