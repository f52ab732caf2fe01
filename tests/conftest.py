"""Fixtures every test file may use: tiny models and corpora built here (no network, no downloads). The tools
that drive gpt2scratch from outside (CLI runner, torchrun, server process) are in gpt2scratch.testing, shared
with bench/."""

import os
import tarfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gpt2scratch.config import GPTConfig  # noqa: E402
from gpt2scratch.dataset.data_module import prepare  # noqa: E402
from gpt2scratch.dataset.sources import EMBEDDED_CORPUS  # noqa: E402
from gpt2scratch.models.kv_cache import KVCache  # noqa: E402
from gpt2scratch.options import PrepareOptions  # noqa: E402
from gpt2scratch.testing import write_random_model  # noqa: E402


def poison_unwritten_cache_positions(monkeypatch) -> None:
    """Every KVCache buffer gets NaN in the positions not written yet (past `length`) when it is allocated (first
    update) or rebuilt (join, keep_rows), so that a path reading them shows it: fresh memory is often zeros, which
    would hide such a read."""

    def poison(cache: KVCache) -> None:
        cache.k[:, :, cache.length :] = float("nan")
        cache.v[:, :, cache.length :] = float("nan")

    update, join, keep_rows = KVCache.update, KVCache.join, KVCache.keep_rows

    def poisoned_update(self, k, v):
        fresh = self.k is None
        out = update(self, k, v)
        if fresh:
            poison(self)
        return out

    def poisoned_join(first, second):
        joined = join(first, second)
        poison(joined)
        return joined

    def poisoned_keep_rows(self, rows):
        keep_rows(self, rows)
        if self.k is not None:
            poison(self)

    monkeypatch.setattr(KVCache, "update", poisoned_update)
    monkeypatch.setattr(KVCache, "join", staticmethod(poisoned_join))
    monkeypatch.setattr(KVCache, "keep_rows", poisoned_keep_rows)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are deselected (not skipped), and `pytest -m cuda` on a
    GPU machine (bench/gpu_check.sh) runs them."""
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("cuda")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> GPTConfig:
    values = dict(vocab_size=101, context_length=32, emb_dim=48, n_heads=4, n_layers=3, drop_rate=0.0)
    values.update(overrides)
    return GPTConfig(**values)


def write_model(folder: Path, context_length: int, emb_dim: int = 32, n_layers: int = 2) -> Path:
    """A random model with GPT-2's vocabulary and tokenizer (what `serve` and `generate` open), sharpened so
    that greedy choices are not near-ties."""
    config = GPTConfig(
        vocab_size=50257, context_length=context_length, emb_dim=emb_dim, n_heads=2, n_layers=n_layers, drop_rate=0.0
    )
    return write_random_model(folder, config, head_scale=20)


@pytest.fixture(scope="session")
def shakespeare_files() -> dict[str, bytes]:
    """The embedded corpus: file name -> its bytes, in the order `prepare` reads them."""
    with tarfile.open(EMBEDDED_CORPUS, "r:xz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        return {m.name: archive.extractfile(m).read() for m in members}


@pytest.fixture(scope="session")
def hamlet_data(tmp_path_factory, shakespeare_files):
    """300 KB of Hamlet prepared with a 512-token BPE, so that tiny models train in milliseconds per step."""
    root = tmp_path_factory.mktemp("hamlet")
    (root / "hamlet.txt").write_bytes(shakespeare_files["hamlet_gut.txt"][:300_000])
    prepare([str(root / "hamlet.txt")], root / "out", PrepareOptions(tokenizer="bpe:512", workers=1, progress=False))
    return root / "out"
