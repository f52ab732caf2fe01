"""GPT-2's byte-level BPE, offline: built from the `vocab.json` + `merges.txt` shipped with this package.

GPT-2's own files (OpenAI's `encoder.json` and `vocab.bpe`, checked by SHA-256) run on tiktoken, the fastest
implementation; any other byte-level BPE in the same two-file format (e.g. one trained by `prepare
--tokenizer bpe:N`, with `train_bpe` below) runs on Hugging Face `tokenizers`. Both give the ids transformers'
GPT2TokenizerFast gives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from functools import cached_property, lru_cache
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
GPT2_DIR = ASSETS / "gpt2"
EOT = "<|endoftext|>"
GPT2_SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenisation regex as tiktoken writes it (possessive quantifiers; same splits as OpenAI's).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, used in vocab.json and merges.txt."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Tokenizer:
    """Encode text to token ids and back. `eot_id` separates documents."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        vocab_file, merges_file = self.directory / "vocab.json", self.directory / "merges.txt"
        if not vocab_file.is_file() and (self.directory / "tokenizer.json").is_file():
            # A folder saved by transformers 5 has only tokenizer.json: read vocab and merges out of it.
            self.directory = materialize(self.directory, Path(tempfile.mkdtemp(prefix="gpt2scratch-tokenizer-")))
            vocab_file, merges_file = self.directory / "vocab.json", self.directory / "merges.txt"
        for path in (vocab_file, merges_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"tokenizer file {path} is missing (a tokenizer folder has vocab.json and merges.txt, "
                    "or a Hugging Face tokenizer.json)"
                )
        self.vocab: dict[str, int] = json.loads(vocab_file.read_text(encoding="utf-8"))
        if EOT not in self.vocab:
            raise ValueError(f"{vocab_file} has no {EOT} token; a GPT-2 style tokenizer needs it as document separator")
        self.eot_id = self.vocab[EOT]
        self.vocab_size = max(self.vocab.values()) + 1
        self.is_gpt2 = all(file_sha256(self.directory / name) == sha for name, sha in GPT2_SHA256.items())
        self.name = "gpt2" if self.is_gpt2 else f"bpe:{self.vocab_size}"
        if self.is_gpt2:
            self._tiktoken = _gpt2_tiktoken(str(vocab_file))
        else:
            self._hf = _hf_tokenizer(str(vocab_file), str(merges_file))

    @classmethod
    def gpt2(cls) -> Tokenizer:
        return cls(GPT2_DIR)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal <|endoftext|> becomes the special token (as transformers does)."""
        if self.is_gpt2:
            return self._tiktoken.encode(text, allowed_special="all")
        return self._hf.encode(text).ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens recognised (for raw corpora)."""
        if self.is_gpt2:
            return self._tiktoken.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        if self.is_gpt2:
            return self._tiktoken.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return [encoding.ids for encoding in self._hf.encode_batch(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.is_gpt2:
            return self._tiktoken.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of `ids` (a token may hold part of a UTF-8 character)."""
        if self.is_gpt2:
            return self._tiktoken.decode_bytes([int(i) for i in ids])
        return b"".join(self._token_bytes[int(i)] for i in ids)

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of N bytes is at least N / this many tokens."""
        return max(len(token) for token in self.vocab)  # one character per byte in vocab.json (EOT: 13)

    @cached_property
    def _token_bytes(self) -> dict[int, bytes]:
        """Each id's bytes, built once (streaming decodes one token at a time)."""
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        return {
            i: token.encode() if token == EOT else bytes(byte_decoder[c] for c in token)
            for token, i in self.vocab.items()
        }

    def hf_tokenizer(self):
        """This tokenizer as a Hugging Face `tokenizers.Tokenizer` (e.g. to write tokenizer.json)."""
        return _hf_tokenizer(str(self.directory / "vocab.json"), str(self.directory / "merges.txt"))

    def save(self, directory: str | Path) -> None:
        """Copy vocab.json and merges.txt into `directory` (the format transformers' GPT2Tokenizer reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            if (directory / name).resolve() != (self.directory / name).resolve():
                shutil.copyfile(self.directory / name, directory / name)


def materialize(source: Path, target: Path) -> Path:
    """Write vocab.json + merges.txt into `target` from `source`'s Hugging Face tokenizer.json (a byte-level
    BPE); GPT-2's own vocabulary gets OpenAI's files, byte for byte."""
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{source / 'tokenizer.json'} is not a byte-level BPE tokenizer (GPT-2 style)")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    target.mkdir(parents=True, exist_ok=True)
    gpt2_vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    gpt2_merges = [m for m in (GPT2_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m]
    if vocab == gpt2_vocab and merges == gpt2_merges:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(GPT2_DIR / name, target / name)
        return target
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (target / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return target


@lru_cache(maxsize=1)
def _gpt2_tiktoken(vocab_file: str):
    import tiktoken

    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    # In GPT-2's vocabulary an id is also the merge rank (the i-th merge made token 256 + i), as tiktoken needs.
    ranks = {bytes(byte_decoder[c] for c in token): i for token, i in vocab.items() if token != EOT}
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: vocab[EOT]},
    )


@lru_cache(maxsize=4)
def _hf_tokenizer(vocab_file: str, merges_file: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(EOT, special=True)])
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, progress: bool = True) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE of `vocab_size` tokens (256 bytes, merges, <|endoftext|>) on `texts`
    with Hugging Face `tokenizers`; save vocab.json + merges.txt (GPT-2's format) in out_dir."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt
    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    if EOT not in vocab:
        vocab[EOT] = max(vocab.values()) + 1
        (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return Tokenizer(out_dir)
