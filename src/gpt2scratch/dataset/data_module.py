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

import contextlib
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


def _init_worker(tokenizer_dir: str, parent: int) -> None:
    global _worker_tokenizer
    _die_with(parent)
    _worker_tokenizer = Tokenizer(tokenizer_dir)


def _die_with(parent: int) -> None:
    """Linux: this worker gets SIGKILL when its parent dies, even by kill -9 (else it would keep running)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before the line above: too late for the signal
        os._exit(1)


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):  # one `prepare` at a time per folder; a second waits, then likely reuses
        _recover(out_dir)
        existing = existing_manifest(out_dir)
        if existing and existing.get("request") == request and existing.get("format_version") == FORMAT_VERSION:
            log.info(f"{out_dir} is up to date with these inputs and settings; reusing it")
            return PrepareResult(out_dir, existing, True, time.perf_counter() - started)
        if existing is not None:
            log.info(f"{out_dir} was prepared from other inputs or settings; rebuilding it")
        work = _sibling(out_dir, f"partial-{os.getpid()}")
        work.mkdir()
        try:
            manifest = _prepare_into(work, sources, options, request)
            manifest["package_version"] = __version__
            write_manifest(work, manifest)  # the new preparation is complete, beside the old one
            _publish(work, out_dir, manifest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(out_dir, manifest, False, time.perf_counter() - started)


def _sibling(out_dir: Path, what: str) -> Path:
    """A hidden folder or file next to out_dir: `.NAME.what`."""
    out_dir = out_dir.resolve()
    return out_dir.parent / f".{out_dir.name}.{what}"


def _siblings(out_dir: Path, pattern: str) -> list[Path]:
    pattern = _sibling(out_dir, pattern)
    return sorted(pattern.parent.glob(pattern.name))


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """An exclusive lock on out_dir (a lock file beside it, released when the process ends, however it ends)."""
    import fcntl

    with open(_sibling(out_dir, "lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"another `gpt2scratch prepare` is writing {out_dir}; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _recover(out_dir: Path) -> None:
    """Tidy up after a run that was killed: put back a preparation moved aside by a publish that did not finish,
    and remove partial work."""
    olds = _siblings(out_dir, "old-*")
    if olds and not (out_dir / MANIFEST).is_file() and (olds[-1] / MANIFEST).is_file():
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(olds[-1], out_dir)
        log.info(f"restored the earlier preparation of {out_dir}, which an interrupted run had moved aside")
    stale = [*_siblings(out_dir, "partial-*"), *_siblings(out_dir, "old-*")]
    for path in [*stale, *out_dir.glob(".partial-*")]:
        shutil.rmtree(path, ignore_errors=True)


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
            with ProcessPoolExecutor(
                options.workers, initializer=_init_worker, initargs=(str(tokenizer_dir), os.getpid())
            ) as pool:
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
    """Put the finished preparation in `work` in place of `out_dir`'s. A folder that holds only a preparation is
    exchanged with `work` in one step (readers see the old preparation or the new one, and a kill loses neither);
    a folder that also holds other files gets the new files moved in, manifest last."""
    if not out_dir.exists() or _only_a_preparation(out_dir):
        _exchange(work, out_dir)
        return
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


def _only_a_preparation(out_dir: Path) -> bool:
    """Whether out_dir holds nothing but what `prepare` writes (so that the whole folder may be replaced)."""
    old = existing_manifest(out_dir) or {}
    splits = old.get("splits") if isinstance(old.get("splits"), dict) else {}
    ours = {MANIFEST, f"{MANIFEST}.tmp", "tokenizer"}
    ours |= {name for info in splits.values() if isinstance(info, dict) for name in info.get("shards", [])}
    return all(path.name in ours or path.name.startswith(".partial-") for path in out_dir.iterdir())


def _exchange(new: Path, out_dir: Path) -> None:
    """Swap the folders `new` and `out_dir` (renameat2 RENAME_EXCHANGE: atomic on Linux); `new` then holds the
    old preparation. Elsewhere: two renames, the old one kept aside until the new one is in (see _recover)."""
    if not out_dir.exists():
        os.replace(new, out_dir)
        return
    if _rename_exchange(new, out_dir):
        return
    aside = _sibling(out_dir, f"old-{os.getpid()}")
    os.replace(out_dir, aside)
    os.replace(new, out_dir)
    os.replace(aside, new)


def _rename_exchange(first: Path, second: Path) -> bool:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


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
