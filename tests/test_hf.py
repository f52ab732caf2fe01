"""Hugging Face interop, as a user runs it: import a transformers model, generate, export, load with the seed's
snippet, fine-tune from it. Every model is a random tiny one built here: no download."""

import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from gpt2scratch import checkpoint, loading
from gpt2scratch.config import GPTConfig
from gpt2scratch.dataset.tokenizer import GPT2_DIR, Tokenizer
from gpt2scratch.hf import export_folder
from gpt2scratch.models import GPT
from gpt2scratch.testing import run_cli


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random tiny transformers GPT-2 with GPT-2's tokenizer, saved the way transformers saves it."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("hf_model")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, bos_token_id=50256, eos_token_id=50256)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(GPT2_DIR).save_pretrained(folder)
    return folder


def hf_greedy_text(folder, prompt: str, n: int) -> str:
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    ids = tokenizer.encode(prompt, return_tensors="pt")
    out = model.generate(
        ids,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=50256,
        attention_mask=torch.ones_like(ids),
    )
    return tokenizer.decode(out[0])


def test_import_then_greedy_generate_equals_transformers(hf_folder, tmp_path):
    """The issue's check: import a transformers model, `generate --temperature 0` gives transformers' greedy text."""
    result = run_cli("import", str(hf_folder), "--out", str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    prompt = "The quick brown fox"
    ours = run_cli(
        "generate", str(tmp_path / "ours"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20"
    )
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.rstrip("\n") == hf_greedy_text(hf_folder, prompt, 20)


def test_export_loads_in_transformers_with_equal_logits_and_exact_round_trip(hf_folder, tmp_path):
    from transformers import GPT2LMHeadModel

    assert run_cli("import", str(hf_folder), "--out", str(tmp_path / "ours")).returncode == 0
    result = run_cli("export", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr
    original = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, original(ids).logits)  # same weights, bit for bit
        assert_close(loading.load(str(tmp_path / "ours")).model(ids)[0], original(ids).logits, rtol=1e-5, atol=1e-5)
    again = loading.load(str(tmp_path / "back"))  # ours -> HF -> ours
    first = loading.load(str(tmp_path / "ours"))
    assert again.config.model == first.config.model
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.model.state_dict().values(), first.model.state_dict().values(), strict=True)
    )


SEED_SNIPPET = """
from transformers import GPT2LMHeadModel, GPT2Tokenizer

# Load model and tokenizer
model_name = "path_to_your_model"
model = GPT2LMHeadModel.from_pretrained(model_name)
tokenizer = GPT2Tokenizer.from_pretrained(model_name)

# Encode input text
input_text = "Once upon a time"
inputs = tokenizer.encode(input_text, return_tensors='pt')

# Generate text
output = model.generate(inputs, max_length=50, num_return_sequences=1)

# Decode and print the result
generated_text = tokenizer.decode(output[0], skip_special_tokens=True)
print(generated_text)
"""


@pytest.mark.parametrize("qkv_bias,tied", [(False, False), (True, True)])
def test_seed_snippet_runs_verbatim_on_an_export(tmp_path, qkv_bias, tied):
    """The seed's usage snippet, unchanged but for the path, loads our export (the seed's default config included:
    untied head, no qkv bias) and transformers' logits equal ours."""
    config = GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=qkv_bias, weight_tying=tied)
    model = GPT(config).eval()
    export_folder(model.state_dict(), config, GPT2_DIR, tmp_path / "hf")
    snippet = SEED_SNIPPET.replace("path_to_your_model", str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("Once upon a time")
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = GPT2Tokenizer.from_pretrained(tmp_path / "hf").encode("Once upon a time", return_tensors="pt")
    assert ids[0].tolist() == Tokenizer.gpt2().encode("Once upon a time")
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids)[0], rtol=1e-5, atol=1e-5)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert files >= {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt"}
    assert files >= {"tokenizer.json", "tokenizer_config.json"}
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["n_positions"] == 64 and hf_config["activation_function"] == "gelu_new"
    assert hf_config["tie_word_embeddings"] is tied
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["top_k"] == 50 and generation["do_sample"] is True
    assert "max_new_tokens" not in generation and "max_length" not in generation  # the caller's length wins
    with torch.no_grad():
        assert hf.generate(ids, max_length=50).shape[1] <= 50  # the seed's snippet: 50 tokens in all
        assert hf.generate(ids, max_new_tokens=7, min_new_tokens=7).shape[1] == ids.shape[1] + 7
    back = loading.load(str(tmp_path / "hf"))
    assert back.config.model == config  # qkv_bias and tying survive the round trip


def test_hub_name_offline_fails_at_once(tmp_path):
    result = run_cli("import", "gpt2-medium", "--out", str(tmp_path / "x"), timeout=60)
    assert result.returncode == 1
    assert "gpt2-medium is not a local folder" in result.stderr and "Traceback" not in result.stderr


def test_train_init_from_a_transformers_model(hf_folder, tmp_path):
    """Fine-tuning: --init-from starts at the imported weights (step-1 loss = the model's loss on that batch)."""
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 300)
    assert run_cli("prepare", str(tmp_path / "text.txt"), "--out", str(tmp_path / "data"), "--quiet").returncode == 0
    args = [
        "train",
        "--init-from",
        str(hf_folder),
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "run"),
    ]
    args += ["--max-steps", "3", "--tokens-per-step", "0", "--batch-size", "2", "--warmup-steps", "1"]
    args += ["--max-lr", "1e-3", "--precision", "fp32"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["model"]["emb_dim"] == 32 and run_config["model"]["vocab_size"] == 50257
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] < 10.9  # not a fresh init's ln(50257) = 10.82 +- noise: these are random weights
    contradiction = run_cli(*args[:-2], "--n-layers", "5", "--overwrite")
    assert contradiction.returncode == 1 and "the shape comes from the model" in contradiction.stderr
    assert checkpoint.latest(tmp_path / "run" / "ckpt") is not None
