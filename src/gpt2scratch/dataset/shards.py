"""The on-disk format of prepared data, in one place: token shards and the manifest (writer and reader).

A prepared folder holds `manifest.json`, `tokenizer/` (vocab.json + merges.txt) and `{train,val}_NNNNNN.bin`.
Each shard, after llm.c's:
    header: 256 little-endian int32 = [MAGIC, FORMAT_VERSION, bytes per token (2 = uint16), token count, 0...]
    body:   token count x uint16 (little-endian)
The manifest (JSON) says which shards each split has, their token, byte and document counts, the tokenizer
(name, vocab_size, eot_id, path, sha256 of its files) and the `request` that made them (inputs and settings).
It is written last, atomically: a folder without one is not a finished preparation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MAGIC = 20241125
FORMAT_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DataError(ValueError):
    """Input or prepared data that cannot be used; the message says what to change or re-run."""


def header(count: int) -> np.ndarray:
    """The header of a shard holding `count` tokens."""
    values = np.zeros(HEADER_INTS, dtype="<i4")
    values[:4] = [MAGIC, FORMAT_VERSION, np.dtype(TOKEN_DTYPE).itemsize, count]
    return values


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens, after checking its header and size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing; re-run `gpt2scratch prepare`")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path} is truncated ({size} bytes, shorter than the header); re-run `gpt2scratch prepare`")
    values = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if values[0] != MAGIC:
        raise DataError(f"{path} is not a token shard (bad magic); re-run `gpt2scratch prepare`")
    if values[1] != FORMAT_VERSION:
        raise DataError(
            f"{path} has shard format version {values[1]}, this gpt2scratch reads {FORMAT_VERSION}; "
            "re-run `gpt2scratch prepare`"
        )
    if values[2] != np.dtype(TOKEN_DTYPE).itemsize:
        raise DataError(f"{path} has {values[2]}-byte tokens, expected uint16; re-run `gpt2scratch prepare`")
    count = int(values[3])
    expected = HEADER_BYTES + count * 2
    if size != expected:
        raise DataError(
            f"{path} is truncated or corrupt ({size} bytes, header says {count} tokens = {expected} bytes); "
            "re-run `gpt2scratch prepare`"
        )
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardWriter:
    """Appends one split's tokens to `{split}_NNNNNN.bin` files of at most `shard_tokens` tokens each; counts the
    tokens, and (filled in by the caller) the text bytes and documents they came from."""

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
        self._file.write(header(0).tobytes())  # the count is written when the shard is closed
        self._in_shard = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.write(header(self._in_shard).tobytes())
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
                    file.write(header(keep).tobytes())
                    file.truncate(HEADER_BYTES + keep * 2)
        return np.concatenate(tail) if tail else np.empty(0, dtype=TOKEN_DTYPE)

    def manifest_entry(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "shards": self.names}


def read_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; create it with `gpt2scratch prepare --out {data_dir}`")
    if not path.is_file():
        raise DataError(
            f"{data_dir} has no {MANIFEST} (not prepared, or preparation did not finish); "
            f"run `gpt2scratch prepare --out {data_dir}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); re-run `gpt2scratch prepare`") from None
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest, path: Path) -> None:
    """The fields readers use, with their types, and every file it names inside its folder: a hand-edited or
    damaged manifest is one clear error here, not a KeyError later."""

    def expect(value, kind: type, where: str):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{path}: {where} is missing or not {kind.__name__}; re-run `gpt2scratch prepare`")
        return value

    expect(manifest, dict, "the manifest")
    tokenizer = expect(manifest.get("tokenizer"), dict, "tokenizer")
    expect(tokenizer.get("name"), str, "tokenizer.name")
    expect(tokenizer.get("vocab_size"), int, "tokenizer.vocab_size")
    inside(path.parent, expect(tokenizer.get("path"), str, "tokenizer.path"), path)
    splits = expect(manifest.get("splits"), dict, "splits")
    for split in SPLITS:
        info = expect(splits.get(split), dict, f"splits.{split}")
        for key in ("tokens", "bytes"):
            expect(info.get(key), int, f"splits.{split}.{key}")
        for name in expect(info.get("shards"), list, f"splits.{split}.shards"):
            inside(path.parent, expect(name, str, f"a shard name of splits.{split}"), path)


def inside(folder: Path, name: str, named_by: Path) -> Path:
    """folder / name, where `name` comes from the file `named_by`: it must not lead out of the folder."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise DataError(f"{named_by} names {name!r}, which is outside {folder}; a file here names only its own folder")
    return target


def existing_manifest(data_dir: str | Path) -> dict | None:
    """The folder's manifest, or None where there is none (or it cannot be read)."""
    try:
        return json.loads((Path(data_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    """Write the manifest atomically (a temporary file renamed over it)."""
    temporary = Path(data_dir) / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, Path(data_dir) / MANIFEST)
