"""What `prepare` reads: inputs resolved into sources, and sources read into documents in bounded memory.

    text file          one document (read 1 MiB at a time, UTF-8)
    .jsonl[.gz]        one document per line, the text in --text-field
    .parquet           one document per row (needs pyarrow)
    saved HF dataset   a folder written by datasets' save_to_disk (needs datasets)
    hub dataset name   streamed from the Hugging Face hub (needs datasets and network)
    (no input)         the embedded corpus: Shakespeare's complete works, shipped with the package

A document is an iterator of text pieces: long texts are cut at places where GPT-2's pre-tokenisation splits
anyway, so tokenising the pieces gives exactly the tokens of the whole.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2scratch.dataset.shards import DataError
from gpt2scratch.dataset.tokenizer import ASSETS, file_sha256
from gpt2scratch.options import PrepareOptions

EMBEDDED_CORPUS = ASSETS / "shakespeare.tar.xz"
READ_BYTES = 1 << 20  # text is read 1 MiB at a time
MAX_PIECE_CHARS = 16 << 20  # a piece with no safe split point is cut here (tokens at the cut may differ)
REPLACEMENT = "\ufffd"

# Places where GPT-2's pre-tokenisation always splits: after "\n" between two non-space characters, and before a
# single space that sits between two non-space characters. Cutting there changes no token.
_SAFE_SPLITS = (re.compile(r"\S\n(?=\S)"), re.compile(r"\S(?= \S)"))


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


def find_sources(inputs: list[str]) -> list[Source]:
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


def _check_hub_reachable(name: str) -> None:
    from gpt2scratch.hub import unreachable_reason

    reason = unreachable_reason()
    if reason is not None:
        raise DataError(
            f"{name} is a Hugging Face hub dataset, but {reason}. Prepare a local copy instead "
            "(text files, .jsonl, .parquet or a dataset saved with save_to_disk)"
        )


def iter_jsonl(path: str | Path, error: type[Exception] = DataError) -> Iterator[tuple[int, object, int]]:
    """(line number, parsed record, bytes of the line) for each non-blank line of a .jsonl or .jsonl.gz file;
    a line that is not JSON raises `error` naming the file and line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    line_number = 0
    with opener(path, "rb") as file:
        try:
            for line_number, line in enumerate(file, start=1):  # noqa: B007 (the number is reported below)
                if not line.strip():
                    yield line_number, None, len(line)
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError) as problem:  # also: bad UTF-8, nesting too deep
                    reason = "nested too deeply" if isinstance(problem, RecursionError) else problem
                    raise error(f"{path}:{line_number} is not valid JSON ({reason})") from None
                yield line_number, record, len(line)
        except (EOFError, gzip.BadGzipFile, zlib.error) as problem:
            raise error(f"{path} is truncated or not gzip (after {line_number} lines: {problem})") from None


class Reader:
    """Reads sources into documents (each an iterator of text pieces); counts the bytes read and, with
    encoding_errors "replace", the invalid UTF-8 sequences replaced by U+FFFD."""

    def __init__(self, options: PrepareOptions):
        self.options = options
        self.bytes_read = 0
        self.replaced = 0

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

    def texts(self, sources: list[Source], max_chars: int) -> Iterator[str]:
        """The text pieces of every document, in order, until about max_chars (for training a tokenizer)."""
        seen = 0
        for source in sources:
            for document in self.documents(source):
                for piece in document:
                    yield piece
                    seen += len(piece)
                    if seen >= max_chars:
                        return

    def _text_pieces(self, file, name: str) -> Iterator[str]:
        decoder = _Utf8Decoder(name, strict=self.options.encoding_errors == "strict")
        buffer = ""
        while data := file.read(READ_BYTES):
            buffer += decoder.decode(data)
            self.bytes_read += len(data)
            piece, buffer = _split_safely(buffer)
            if piece:
                yield piece
        buffer += decoder.decode(b"", final=True)
        self.replaced += decoder.replaced
        if buffer:
            yield buffer

    def _jsonl(self, path: str) -> Iterator[Iterator[str]]:
        for line_number, record, n_bytes in iter_jsonl(path):
            self.bytes_read += n_bytes
            if record is not None:
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


class _Utf8Decoder:
    """Incremental UTF-8 decoding of one file. Strict: the first invalid byte is an error naming the file and the
    byte offset. Otherwise each invalid sequence becomes U+FFFD, counted as the U+FFFDs decoded minus those the
    file spells out itself (the bytes EF BF BD, which no invalid sequence can take part of)."""

    def __init__(self, name: str, strict: bool):
        self.name, self.strict = name, strict
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict" if strict else "replace")
        self._offset = 0  # bytes fed so far
        self._tail = b""  # the last two bytes fed: a spelled-out U+FFFD may straddle two reads
        self.replaced = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        held = len(self._decoder.getstate()[0])  # bytes of an unfinished character from the previous read
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as error:  # error.start counts from the held bytes
            offset = self._offset - held + error.start
            raise DataError(
                f"{self.name} is not UTF-8 (invalid byte at offset {offset}); convert it to UTF-8, "
                "or pass --encoding-errors replace to replace invalid bytes with U+FFFD"
            ) from None
        self._offset += len(data)
        if not self.strict:
            window = self._tail + data
            self.replaced += text.count(REPLACEMENT) - window.count(REPLACEMENT.encode())
            self._tail = window[-2:]
        return text


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
