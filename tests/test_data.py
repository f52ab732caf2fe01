"""The data pipeline: text -> shards (checked against transformers' tokenizer) -> exact, resumable batches."""

import gzip
import json

import numpy as np
import pytest

from gpt2scratch.dataset import data_module, sources
from gpt2scratch.dataset.data_module import DataModule, prepare
from gpt2scratch.dataset.dataset import TokenSplit, TrainLoader, val_batches
from gpt2scratch.dataset.shards import DataError, read_manifest, read_shard
from gpt2scratch.dataset.tokenizer import EOT, Tokenizer
from gpt2scratch.options import PrepareOptions
from gpt2scratch.testing import run_cli

EOT_ID = 50256


def options(**overrides) -> PrepareOptions:
    values = dict(workers=1, progress=False)
    values.update(overrides)
    return PrepareOptions(**values)


def split_text(data_dir, split: str) -> str:
    manifest = read_manifest(data_dir)
    tokenizer = Tokenizer(data_dir / manifest["tokenizer"]["path"])
    tokens = np.concatenate([read_shard(data_dir / name) for name in manifest["splits"][split]["shards"]])
    return tokenizer.decode(tokens)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    prepare([], out, options())
    return out


@pytest.fixture(scope="module")
def shakespeare_texts(shakespeare_files):
    return [data.decode("utf-8") for data in shakespeare_files.values()]


def test_embedded_corpus_decodes_back_to_shakespeare(shakespeare, shakespeare_texts):
    """Failure means the shards are not the corpus: lost, reordered or mis-tokenised text."""
    assert len(shakespeare_texts) == 42
    train, val = split_text(shakespeare, "train"), split_text(shakespeare, "val")
    train_docs, val_docs = train.split(EOT)[1:], val.split(EOT)[1:]
    assert train.startswith(EOT) and val.startswith(EOT)
    assert sorted(train_docs + val_docs) == sorted(shakespeare_texts)
    assert train_docs == [t for t in shakespeare_texts if t in set(train_docs)]  # document order kept
    assert val_docs and train_docs


def test_manifest_counts_equal_transformers_tokenizer(shakespeare, shakespeare_texts):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(shakespeare / "tokenizer")
    manifest = read_manifest(shakespeare)
    splits = manifest["splits"]
    total_tokens = sum(len(hf.encode(text)) for text in shakespeare_texts) + len(shakespeare_texts)  # + separators
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == total_tokens
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == sum(len(t.encode()) for t in shakespeare_texts)
    assert splits["train"]["documents"] + splits["val"]["documents"] == 42
    assert manifest["tokenizer"] == manifest["tokenizer"] | {"name": "gpt2", "vocab_size": 50257, "eot_id": EOT_ID}
    val_text = split_text(shakespeare, "val").split(EOT)[1:]
    assert splits["val"]["bytes"] == sum(len(t.encode()) for t in val_text)
    assert manifest["package_version"]


def test_pieces_of_a_long_text_tokenise_like_the_whole(tmp_path, monkeypatch, shakespeare_texts):
    """Long texts are cut into pieces; cutting must never change a token (runs of spaces/newlines included)."""
    text = "".join(t[:20000] + "\n\n\n   \n  x  \t\n" + " " * 7 for t in shakespeare_texts[:6]) + "tail   "
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "READ_BYTES", 4096)
    monkeypatch.setattr(data_module, "TASK_CHARS", 1000)
    prepare([str(tmp_path / "long.txt")], tmp_path / "out", options(val_fraction=0.5, shard_tokens=5000))
    tokens = np.concatenate(
        [
            read_shard(tmp_path / "out" / n)
            for s in ("train", "val")
            for n in read_manifest(tmp_path / "out")["splits"][s]["shards"]
        ]
    )
    tokenizer = Tokenizer.gpt2()
    assert tokens.tolist() == [EOT_ID] + tokenizer.encode(text)  # one document, its tail moved to val


def test_many_workers_write_the_same_shards_as_one(tmp_path, shakespeare):
    prepare([], tmp_path, options(workers=2))
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / name).read_bytes() == (shakespeare / name).read_bytes()


def test_split_by_document_is_seeded_and_val_never_empty(tmp_path):
    for i in range(20):
        (tmp_path / "in" / f"{i:02d}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / f"{i:02d}" / "doc.txt").write_text(f"document number {i}. " * 50)
    a = prepare([str(tmp_path / "in")], tmp_path / "a", options(val_fraction=0.25, seed=1)).manifest
    b = prepare([str(tmp_path / "in")], tmp_path / "b", options(val_fraction=0.25, seed=1)).manifest
    prepare([str(tmp_path / "in")], tmp_path / "c", options(val_fraction=0.25, seed=2))
    assert a["splits"] == b["splits"]
    assert split_text(tmp_path / "a", "val") != split_text(tmp_path / "c", "val")
    tiny = prepare([str(tmp_path / "in" / "00" / "doc.txt")], tmp_path / "one", options(val_fraction=0.1)).manifest
    assert tiny["splits"]["val"]["tokens"] > 0 and tiny["splits"]["train"]["tokens"] > 0
    whole = split_text(tmp_path / "one", "train") + split_text(tmp_path / "one", "val")
    assert whole == EOT + "document number 0. " * 50
    bytes_total = tiny["splits"]["train"]["bytes"] + tiny["splits"]["val"]["bytes"]
    assert bytes_total == len("document number 0. " * 50)


def test_jsonl_gzip_and_parquet_inputs(tmp_path):
    records = [{"text": f"record {i} says hello", "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as file:
        file.write("\n".join(json.dumps({"body": "gzipped " + r["text"]}) for r in records))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two"]}), tmp_path / "c.parquet")
    prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "c.parquet")], tmp_path / "out", options())
    docs = (split_text(tmp_path / "out", "train") + split_text(tmp_path / "out", "val")).split(EOT)[1:]
    assert sorted(docs) == sorted([r["text"] for r in records] + ["parquet row one", "parquet row two"])
    prepare([str(tmp_path / "b.jsonl.gz")], tmp_path / "gz", options(text_field="body"))
    docs = (split_text(tmp_path / "gz", "train") + split_text(tmp_path / "gz", "val")).split(EOT)[1:]
    assert sorted(docs) == sorted("gzipped " + r["text"] for r in records)


def test_rerun_reuses_and_a_changed_input_rebuilds(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("first version of the text. " * 100)
    assert not prepare([str(source)], tmp_path / "out", options()).reused
    assert prepare([str(source)], tmp_path / "out", options()).reused
    source.write_text("second version of the text. " * 100)
    result = prepare([str(source)], tmp_path / "out", options())
    assert not result.reused and "second version" in split_text(tmp_path / "out", "train")
    assert not prepare([str(source)], tmp_path / "out", options(tokenizer="bpe:300")).reused  # tokenizer changed


def test_a_failed_run_leaves_the_previous_preparation_whole(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("good text here. " * 100)
    prepare([str(good)], tmp_path / "out", options())
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    bad.write_bytes(b"valid start " * 10 + b"\xff\xfe broken")
    with pytest.raises(DataError, match=r"bad.txt is not UTF-8 \(invalid byte at offset 120\)"):
        prepare([str(good), str(bad)], tmp_path / "out", options())
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before and not list((tmp_path / "out").glob(".partial-*"))
    DataModule(tmp_path / "out", context_length=8, batch_size=2).train_loader().next_batch()


def test_a_killed_run_is_not_taken_for_complete(tmp_path):
    (tmp_path / "out" / ".partial-999").mkdir(parents=True)
    (tmp_path / "out" / ".partial-999" / "train_000000.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(DataError, match="has no manifest.json"):
        DataModule(tmp_path / "out", context_length=8, batch_size=2)
    (tmp_path / "t.txt").write_text("some text " * 50)
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", options())
    assert not (tmp_path / "out" / ".partial-999").exists()


def test_encoding_errors_replace_counts(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait " * 20)
    manifest = prepare([str(tmp_path / "bad.txt")], tmp_path / "out", options(encoding_errors="replace")).manifest
    assert manifest["replaced_characters"] == 20
    assert "caf\ufffd au lait" in split_text(tmp_path / "out", "train")


def test_custom_bpe_tokenizer_round_trips_and_matches_transformers(tmp_path, shakespeare_texts):
    (tmp_path / "corpus.txt").write_text(shakespeare_texts[0][:200000])
    manifest = prepare([str(tmp_path / "corpus.txt")], tmp_path / "out", options(tokenizer="bpe:1024")).manifest
    assert manifest["tokenizer"]["name"] == "bpe:1024" and manifest["tokenizer"]["vocab_size"] == 1024
    text = split_text(tmp_path / "out", "train") + split_text(tmp_path / "out", "val")
    assert text == EOT + shakespeare_texts[0][:200000]
    from transformers import GPT2TokenizerFast

    ours = Tokenizer(tmp_path / "out" / "tokenizer")
    hf = GPT2TokenizerFast.from_pretrained(tmp_path / "out" / "tokenizer")
    sample = "To be, or not to be: that is the question.\n\n  Whether 'tis nobler — ünïcode 🎉"
    assert ours.encode(sample) == hf.encode(sample) and ours.decode(ours.encode(sample)) == sample
    assert ours.encode(EOT) == [ours.eot_id] == [hf.convert_tokens_to_ids(EOT)]


@pytest.mark.parametrize(
    "setup,inputs,message",
    [
        (None, ["missing.txt"], "input missing.txt does not exist"),
        (lambda p: (p / "empty.txt").write_text(""), ["empty.txt"], "the inputs hold no text"),
        (lambda p: (p / "emptydir").mkdir(), ["emptydir"], "input folder .*emptydir holds no files"),
        (
            lambda p: (p / "x.jsonl").write_text('{"text": "ok"}\n{broken\n'),
            ["x.jsonl"],
            r"x.jsonl:2 is not valid JSON",
        ),
        (lambda p: (p / "y.jsonl").write_text('{"body": "ok"}\n'), ["y.jsonl"], r"y.jsonl:1 has no 'text' field"),
        (
            lambda p: (p / "z.bin").write_bytes(b"\x00\x9f\x92"),
            ["z.bin"],
            r"z.bin is not UTF-8 \(invalid byte at offset 1\)",
        ),
        (lambda p: (p / "w.txt").write_text("ab"), ["w.txt"], "too few to split into train and val"),
    ],
)
def test_bad_inputs_get_a_clear_error_and_no_output(tmp_path, monkeypatch, setup, inputs, message):
    monkeypatch.chdir(tmp_path)
    if setup:
        setup(tmp_path)
    with pytest.raises(DataError, match=message):
        prepare(inputs, tmp_path / "out", options())
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.bin"))


def test_hub_dataset_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HuggingFaceFW/fineweb-edu is a Hugging Face hub dataset, but HF_HUB_OFFLINE"):
        prepare(["HuggingFaceFW/fineweb-edu"], tmp_path / "out", options(hf_config="sample-10BT"))


def test_vocabulary_beyond_uint16_is_rejected():
    with pytest.raises(ValueError, match="token ids must fit the shards' uint16"):
        PrepareOptions(tokenizer="bpe:70000")


def test_bad_shards_say_rerun_prepare(tmp_path, shakespeare):
    import shutil

    shutil.copytree(shakespeare, tmp_path / "d")
    shard = tmp_path / "d" / "val_000000.bin"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match="val_000000.bin is truncated or corrupt .*re-run `gpt2scratch prepare`"):
        TokenSplit(tmp_path / "d", "val")
    data[0] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(DataError, match=r"val_000000.bin is not a token shard \(bad magic\); re-run"):
        TokenSplit(tmp_path / "d", "val")


def test_corpus_shorter_than_a_context_window(tmp_path):
    (tmp_path / "t.txt").write_text("a short text of a few words, " * 4)
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", options())
    with pytest.raises(DataError, match="fewer than one context window"):
        DataModule(tmp_path / "out", context_length=1024, batch_size=1).train_loader()


# ----------------------------------------------------------------------------------------------------------------------
# Loader


def _windows(loader: TrainLoader, steps: int) -> list[list[int]]:
    return [loader.next_batch()[0][:, 0].tolist() for _ in range(steps)]  # first token stands for its window


def test_same_seed_same_batches_and_y_is_x_shifted(shakespeare):
    split = TokenSplit(shakespeare, "train")
    a, b = TrainLoader(split, 64, 4, seed=7), TrainLoader(split, 64, 4, seed=7)
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1]) and xa.shape == (4, 64) and xa.dtype == np.int64
    c = TrainLoader(split, 64, 4, seed=8)
    assert not np.array_equal(TrainLoader(split, 64, 4, seed=7).next_batch()[0], c.next_batch()[0])


def test_ranks_get_disjoint_windows_that_cover_the_epoch(tmp_path):
    (tmp_path / "t.txt").write_text(" ".join(str(i) for i in range(3000)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", options())
    split = TokenSplit(tmp_path / "out", "train")
    T, B, world = 16, 2, 3
    n_windows = (len(split) - 1) // T
    steps = n_windows // (B * world)
    seen = []
    for rank in range(world):
        loader = TrainLoader(split, T, B, seed=1, rank=rank, world_size=world)
        for _ in range(steps):
            x, _ = loader.next_batch()
            seen += [tuple(row) for row in x.tolist()]
    single = TrainLoader(split, T, B * world, seed=1)
    expected = [tuple(row) for _ in range(steps) for row in single.next_batch()[0].tolist()]
    assert len(seen) == len(set(seen)) == steps * B * world  # disjoint
    assert sorted(seen) == sorted(expected)  # the same windows one process sees at the same global batch
    every_window = {tuple(split.read(w * T, T).tolist()) for w in range(n_windows)}
    assert len(every_window - set(seen)) == n_windows - steps * B * world  # all but the dropped remainder


def test_epochs_differ_and_resume_gives_the_same_next_batches(shakespeare):
    split = TokenSplit(shakespeare, "val")
    loader = TrainLoader(split, 128, 8, seed=3)
    per_epoch = (len(split) - 1) // 128 // 8
    first_epoch = _windows(loader, per_epoch)
    second_epoch = _windows(loader, per_epoch)
    assert loader.state.epoch == 1 and first_epoch != second_epoch
    state = loader.state_dict()
    expected = _windows(loader, 7)
    resumed = TrainLoader(split, 128, 8, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert _windows(resumed, 7) == expected


def test_val_batches_cover_the_split_in_order_across_ranks(shakespeare):
    split = TokenSplit(shakespeare, "val")
    one = np.concatenate([x for x, _ in val_batches(split, 256, 5)])
    assert one.shape == ((len(split) - 1) // 256, 256)
    assert np.array_equal(one.reshape(-1), split.read(0, one.size))
    ranks = [np.concatenate([x for x, _ in val_batches(split, 256, 5, rank=r, world_size=2)]) for r in range(2)]
    assert np.array_equal(np.concatenate(ranks)[np.argsort(np.r_[0 : len(one) : 2, 1 : len(one) : 2])], one)


def test_cli_prepare_bad_input_is_one_line(tmp_path):
    result = run_cli("prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gpt2scratch prepare: error: input {tmp_path}/nope.txt does not exist "
        "(expected a file, a folder or a Hugging Face dataset name)"
    ]


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets

    rows = {"text": ["first row of a dataset", "second row", "third row here"], "n": [1, 2, 3]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    for name in ("ds", "dd"):
        prepare([str(tmp_path / name)], tmp_path / f"out-{name}", options())
        docs = (split_text(tmp_path / f"out-{name}", "train") + split_text(tmp_path / f"out-{name}", "val")).split(EOT)
        assert sorted(docs[1:]) == sorted(rows["text"])
    with pytest.raises(DataError, match="has splits \\['train'\\], not 'test'; use --hf-split"):
        prepare([str(tmp_path / "dd")], tmp_path / "out-test", options(hf_split="test"))
