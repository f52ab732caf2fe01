"""The offline GPT-2 tokenizer against transformers' GPT2TokenizerFast built from the same files."""

import pytest

from gpt2scratch.dataset.tokenizer import EOT, GPT2_DIR, Tokenizer

TEXTS = [
    "Hello world",
    "héllo wörld: naïve café, Ünïcödé — “curly quotes” and ‘single’ ones",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🎉🎉🎉 👩‍👩‍👧 🇫🇷 and symbols ∑∫√ ≠ ≤",
    "   leading spaces, runs     of     spaces, trailing   ",
    "\n\n\nnewlines\n\n\n\nand\r\nwindows\tlines\t\t tabs \n \n",
    "I'm sure you're right; we'll see what they've done, he'd've said. DON'T SHOUT",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "first document<|endoftext|>second document",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(GPT2_DIR)


def test_hello_world():
    assert Tokenizer.gpt2().encode("Hello world") == [15496, 995]


def test_gpt2_constants():
    tokenizer = Tokenizer.gpt2()
    assert tokenizer.vocab_size == 50257 and tokenizer.eot_id == 50256 and tokenizer.is_gpt2


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(hf_tokenizer, text):
    """Failure means our BPE splits text differently from GPT-2's reference tokenizer."""
    tokenizer = Tokenizer.gpt2()
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_encode_equals_one_by_one():
    tokenizer = Tokenizer.gpt2()
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(text) for text in TEXTS]


def test_special_token_only_when_asked():
    tokenizer = Tokenizer.gpt2()
    assert tokenizer.encode(EOT) == [50256]
    assert 50256 not in tokenizer.encode_ordinary(EOT)


def test_decode_bytes_keeps_partial_characters():
    tokenizer = Tokenizer.gpt2()
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1 and b"".join(tokenizer.decode_bytes([i]) for i in ids) == "🎉".encode()


def test_missing_or_bad_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json is missing"):
        Tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="has no <\\|endoftext\\|> token"):
        Tokenizer(tmp_path)
