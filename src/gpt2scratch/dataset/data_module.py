"""Corpus preparation: any text -> GPT-2 token shards + manifest.json (`gpt2scratch prepare`).

    gpt2scratch prepare --out data/shakespeare            # the embedded corpus (Shakespeare), offline
    gpt2scratch prepare my_texts/ notes.txt --out data/mine
    gpt2scratch prepare HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out data/fineweb   # online

Inputs are read as a stream of documents (a text file is one document; a JSONL line, a Parquet row or a
dataset row is one document) in bounded memory: long texts are cut into pieces at places where GPT-2's
pre-tokenisation splits anyway, so tokenising the pieces gives exactly the tokens of the whole. Pieces are
tokenised by a pool of processes, results are taken back in order, and each document goes whole to the
train or val split by a seeded draw. Each document starts with <|endoftext|>.

Everything is written to a hidden temporary folder and moved into place at the end, manifest last: a
killed run leaves nothing that a later run (or the trainer) takes for complete.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tarfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2scratch.dataset.dataset import (
    FORMAT_VERSION,
    HEADER_INTS,
    MAGIC,
    MANIFEST,
    SPLITS,
    TOKEN_DTYPE,
    DataError,
    read_shard,
)
from gpt2scratch.dataset.tokenizer import ASSETS, EOT, Tokenizer, file_sha256

log = logging.getLogger(__name__)

EMBEDDED_CORPUS = ASSETS / "shakespeare.tar.xz"
MAX_UINT16_VOCAB = 2**16
READ_BYTES = 1 << 20  # text is read 1 MiB at a time
TASK_CHARS = 1 << 20  # about this much text per tokenisation task
MAX_PIECE_CHARS = 16 << 20  # a piece with no safe split point is cut here (tokens at the cut may differ)
TOKENIZER_SAMPLE_BYTES = 256 << 20  # `--tokenizer bpe:N` learns its merges from at most this much text

# Places where GPT-2's pre-tokenisation always splits: after "\n" between two non-space characters, and before a
# single space that sits between two non-space characters. Cutting there changes no token.
_SAFE_SPLITS = (re.compile(r"\S\n(?=\S)"), re.compile(r"\S(?= \S)"))


@dataclass
class PrepareOptions:
    """How `prepare` turns inputs into shards. Defaults are those of the command line."""

    tokenizer: str = "gpt2"  # "gpt2" or "bpe:VOCAB_SIZE" (a byte-level BPE trained on the corpus)
    val_fraction: float = 0.1
    seed: int = 1337
    shard_tokens: int = 100_000_000
    text_field: str = "text"
    encoding_errors: str = "strict"  # "strict": stop at the first invalid UTF-8 byte; "replace": U+FFFD, counted
    hf_config: str | None = None
    hf_split: str = "train"
    workers: int = field(
        default_factory=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    )
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction ({self.val_fraction}) must be in (0, 1), e.g. 0.1")
        if not 1 <= self.shard_tokens < 2**31:
            raise ValueError(f"shard_tokens ({self.shard_tokens}) must be in [1, 2^31)")
        if self.encoding_errors not in ("strict", "replace"):
            raise ValueError(f"encoding_errors ({self.encoding_errors!r}) must be 'strict' or 'replace'")
        if self.workers < 1:
            raise ValueError(f"workers ({self.workers}) must be >= 1")
        if self.tokenizer != "gpt2":
            match = re.fullmatch(r"bpe:(\d+)", self.tokenizer)
            if not match:
                raise ValueError(f"tokenizer ({self.tokenizer!r}) must be 'gpt2' or 'bpe:VOCAB_SIZE', e.g. bpe:8192")
            vocab_size = int(match.group(1))
            if not 257 < vocab_size <= MAX_UINT16_VOCAB:
                raise ValueError(
                    f"tokenizer vocabulary ({vocab_size}) must be in (257, {MAX_UINT16_VOCAB}]: 256 bytes + "
                    "<|endoftext|> + merges, and token ids must fit the shards' uint16"
                )


# ----------------------------------------------------------------------------------------------------------------------
# Sources: what the inputs are, and the documents they hold.


@dataclass
class Source:
    kind: str  # embedded | text | jsonl | parquet | hf_disk | hf_hub
    path: str
    size: int = 0  # bytes on disk (0 where unknown)

    def describe(self, options: PrepareOptions) -> dict:
        """What identifies this input in the manifest: a changed description means the shards are stale."""
        if self.kind == "hf_hub":
            return {"kind": self.kind, "name": self.path, "config": options.hf_config, "split": options.hf_split}
        if self.kind == "hf_disk":
            files = sorted(p for p in Path(self.path).rglob("*") if p.is_file())
            digest = hashlib.sha256()
            for p in files:
                digest.update(f"{p.relative_to(self.path)}\0{file_sha256(p)}\0".encode())
            return {"kind": self.kind, "path": self.path, "size": self.size, "sha256": digest.hexdigest()}
        path = EMBEDDED_CORPUS if self.kind == "embedded" else Path(self.path)
        return {"kind": self.kind, "path": self.path, "size": self.size, "sha256": file_sha256(path)}


def find_sources(inputs: list[str], options: PrepareOptions) -> list[Source]:
    """Resolve the command-line inputs into sources; a missing path fails here, before any work."""
    if not inputs:
        with tarfile.open(EMBEDDED_CORPUS, "r:xz") as archive:
            size = sum(member.size for member in archive.getmembers() if member.isfile())
        return [Source("embedded", "shakespeare", size)]
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                sources.append(
                    Source("hf_disk", str(path), sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
                )
                continue
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)
            )
            if not files:
                raise DataError(f"input folder {path} holds no files")
            sources += [_file_source(p) for p in files]
        elif path.is_file():
            sources.append(_file_source(path))
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", item) and not path.parent.exists():
            _check_hub_reachable(item)  # offline: fail now, not after minutes of retries
            sources.append(Source("hf_hub", item))
        else:
            raise DataError(f"input {item} does not exist (expected a file, a folder or a Hugging Face dataset name)")
    return sources


def _file_source(path: Path) -> Source:
    name = path.name.lower()
    kind = "jsonl" if name.endswith((".jsonl", ".jsonl.gz")) else "parquet" if name.endswith(".parquet") else "text"
    return Source(kind, str(path), path.stat().st_size)


class _Reader:
    """Reads sources into documents (each an iterator of text pieces), counting bytes and replaced characters."""

    def __init__(self, options: PrepareOptions):
        self.options = options
        self.bytes_read = 0

    def documents(self, source: Source) -> Iterator[Iterator[str]]:
        if source.kind == "embedded":
            with tarfile.open(EMBEDDED_CORPUS, "r:xz") as archive:
                for member in sorted(archive.getmembers(), key=lambda m: m.name):
                    if member.isfile():
                        yield self._text_pieces(archive.extractfile(member), f"{EMBEDDED_CORPUS.name}:{member.name}")
        elif source.kind == "text":
            with open(source.path, "rb") as file:
                yield self._text_pieces(file, source.path)
        elif source.kind == "jsonl":
            yield from self._jsonl(source.path)
        elif source.kind == "parquet":
            yield from self._parquet(source.path)
        else:
            yield from self._hf(source)

    def _decode(self, data: bytes, decoder, name: str, offset: int, final: bool = False) -> str:
        try:
            return decoder.decode(data, final)
        except UnicodeDecodeError as error:
            raise DataError(
                f"{name} is not UTF-8 (invalid byte at offset {offset + error.start}); convert it to UTF-8, "
                "or pass --encoding-errors replace to replace invalid bytes with U+FFFD"
            ) from None

    def _text_pieces(self, file, name: str) -> Iterator[str]:
        errors = "strict" if self.options.encoding_errors == "strict" else "gpt2scratch-count"
        decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        buffer, offset = "", 0
        while data := file.read(READ_BYTES):
            buffer += self._decode(data, decoder, name, offset - len(decoder.getstate()[0]))
            offset += len(data)
            self.bytes_read += len(data)
            piece, buffer = _split_safely(buffer)
            if piece:
                yield piece
        buffer += self._decode(b"", decoder, name, offset - len(decoder.getstate()[0]), final=True)
        if buffer:
            yield buffer

    def _jsonl(self, path: str) -> Iterator[Iterator[str]]:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as file:
            for line_number, line in enumerate(file, start=1):
                self.bytes_read += len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise DataError(f"{path}:{line_number} is not valid JSON ({error})") from None
                yield iter([self._field(record, f"{path}:{line_number}")])

    def _field(self, record, where: str) -> str:
        field_name = self.options.text_field
        if not isinstance(record, dict) or field_name not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where} has no '{field_name}' field (has {keys}); choose the field with --text-field")
        text = record[field_name]
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{field_name}' is {type(text).__name__}, not text")
        return text

    def _parquet(self, path: str) -> Iterator[Iterator[str]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        file = pq.ParquetFile(path)
        if self.options.text_field not in file.schema_arrow.names:
            raise DataError(
                f"{path} has no '{self.options.text_field}' column (has {file.schema_arrow.names}); "
                "choose the column with --text-field"
            )
        for batch in file.iter_batches(columns=[self.options.text_field]):
            self.bytes_read += batch.nbytes
            for text in batch.column(0).to_pylist():
                if text:
                    yield iter([text])

    def _hf(self, source: Source) -> Iterator[Iterator[str]]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"reading {source.path} needs the Hugging Face datasets library: pip install datasets"
            ) from None
        if source.kind == "hf_disk":
            data = datasets.load_from_disk(source.path)
            if isinstance(data, datasets.DatasetDict):
                if self.options.hf_split not in data:
                    raise DataError(
                        f"{source.path} has splits {list(data)}, not '{self.options.hf_split}'; use --hf-split"
                    )
                data = data[self.options.hf_split]
        else:
            data = datasets.load_dataset(
                source.path, self.options.hf_config, split=self.options.hf_split, streaming=True
            )
        for index, record in enumerate(data):
            text = self._field(record, f"{source.path} row {index}")
            self.bytes_read += len(text.encode("utf-8"))
            yield iter([text])


def _count_replacements(error: UnicodeDecodeError):
    _REPLACED[0] += 1
    return "\ufffd", error.end


_REPLACED = [0]
codecs.register_error("gpt2scratch-count", _count_replacements)


def _split_safely(buffer: str) -> tuple[str, str]:
    """(piece to tokenise now, rest to keep), cut where no token can straddle the cut."""
    if len(buffer) < READ_BYTES // 2:
        return "", buffer
    for pattern in _SAFE_SPLITS:
        cuts = [match.end() for match in pattern.finditer(buffer, max(0, len(buffer) - READ_BYTES))]
        if cuts:
            return buffer[: cuts[-1]], buffer[cuts[-1] :]
    if len(buffer) > MAX_PIECE_CHARS:
        return buffer, ""
    return "", buffer


def _check_hub_reachable(name: str) -> None:
    from gpt2scratch.hub import unreachable_reason

    reason = unreachable_reason()
    if reason is not None:
        raise DataError(
            f"{name} is a Hugging Face hub dataset, but {reason}. Prepare a local copy instead "
            "(text files, .jsonl, .parquet or a dataset saved with save_to_disk)"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Tokenisation workers.

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_dir)


def _tokenize(pieces: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode_ordinary(piece), dtype=TOKEN_DTYPE) for piece in pieces]


# ----------------------------------------------------------------------------------------------------------------------
# Shard writing.


class _ShardWriter:
    """Appends tokens to `{split}_NNNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.names: list[str] = []
        self.tokens = 0
        self.bytes = 0
        self.documents = 0
        self._file = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            self._file.write(tokens[:take].astype("<u2").tobytes())
            self._in_shard += take
            self.tokens += take
            tokens = tokens[take:]
            if self._in_shard == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        name = f"{self.split}_{len(self.names):06d}.bin"
        self.names.append(name)
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in _close, when the shard is full)
        self._file.write(_header(0).tobytes())
        self._in_shard = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.write(_header(self._in_shard).tobytes())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self._close()

    def take_tail(self, count: int) -> np.ndarray:
        """Remove and return the last `count` tokens written (after finish())."""
        tail = []
        while count > 0 and self.names:
            path = self.directory / self.names[-1]
            tokens = np.array(read_shard(path))
            keep = max(0, len(tokens) - count)
            tail.insert(0, tokens[keep:])
            count -= len(tokens) - keep
            self.tokens -= len(tokens) - keep
            if keep == 0:
                path.unlink()
                self.names.pop()
            else:
                with open(path, "r+b") as file:
                    file.write(_header(keep).tobytes())
                    file.truncate((HEADER_INTS * 4) + keep * 2)
        return np.concatenate(tail) if tail else np.empty(0, dtype=TOKEN_DTYPE)


def _header(count: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = [MAGIC, FORMAT_VERSION, np.dtype(TOKEN_DTYPE).itemsize, count]
    return header


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
    sources = find_sources(inputs, options)
    request = {
        "sources": [source.describe(options) for source in sources],
        "tokenizer": options.tokenizer,
        "val_fraction": options.val_fraction,
        "seed": options.seed,
        "shard_tokens": options.shard_tokens,
        "text_field": options.text_field,
        "encoding_errors": options.encoding_errors,
    }
    existing = _existing_manifest(out_dir)
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


def _existing_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _prepare_into(work: Path, sources: list[Source], options: PrepareOptions, request: dict) -> dict:
    tokenizer_dir = work / "tokenizer"
    if options.tokenizer == "gpt2":
        Tokenizer.gpt2().save(tokenizer_dir)
    else:
        train_bpe(sources, options, tokenizer_dir)
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > MAX_UINT16_VOCAB:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens; ids beyond {MAX_UINT16_VOCAB - 1} "
            "do not fit uint16 shards"
        )

    writers = {split: _ShardWriter(work, split, options.shard_tokens) for split in SPLITS}
    reader = _Reader(options)
    _REPLACED[0] = 0
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
            _init_worker(str(tokenizer_dir))
            for batch in tasks():
                consume(batch, _tokenize([text for _, text, _ in batch]))
        else:
            with ProcessPoolExecutor(options.workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
                pending: deque = deque()
                for batch in tasks():
                    pending.append((batch, pool.submit(_tokenize, [text for _, text, _ in batch])))
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
    if _REPLACED[0]:
        log.warning(f"replaced {_REPLACED[0]:,} invalid UTF-8 sequence(s) with U+FFFD (--encoding-errors replace)")

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
        "splits": {
            name: {"tokens": w.tokens, "bytes": w.bytes, "documents": w.documents, "shards": w.names}
            for name, w in writers.items()
        },
        "replaced_characters": _REPLACED[0],
        "request": request,
    }


def _rebalance(full: _ShardWriter, empty: _ShardWriter, options: PrepareOptions, tokenizer: Tokenizer) -> None:
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
    old = _existing_manifest(out_dir)
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
    temporary = out_dir / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, out_dir / MANIFEST)


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------------
# Training a byte-level BPE on the corpus (`--tokenizer bpe:N`).


def train_bpe(sources: list[Source], options: PrepareOptions, out_dir: Path) -> None:
    """Train a GPT-2-style byte-level BPE with Hugging Face `tokenizers`; save vocab.json + merges.txt."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    vocab_size = int(options.tokenizer.split(":")[1])
    reader = _Reader(options)

    def texts() -> Iterator[str]:
        seen = 0
        for source in sources:
            for document in reader.documents(source):
                for piece in document:
                    yield piece
                    seen += len(piece)
                    if seen >= TOKENIZER_SAMPLE_BYTES:
                        return

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=options.progress,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt, GPT-2's format
    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    if EOT not in vocab:
        vocab[EOT] = max(vocab.values()) + 1
        (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
