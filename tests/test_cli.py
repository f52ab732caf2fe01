"""The command line, run as a user runs it (a subprocess), for `info`; messages for missing optional libraries."""

import json
import sys

import pytest

from gpt2scratch.config import GPTConfig
from gpt2scratch.metrics import MetricsLogger
from gpt2scratch.serve import require_serving_libraries
from gpt2scratch.testing import run_cli as run
from gpt2scratch.testing import write_random_model


def test_info_json_gpt2_and_seed_default():
    gpt2 = json.loads(run("info", "--preset", "gpt2", "--json").stdout)
    assert gpt2["n_params"] == 124_439_808
    assert gpt2["n_params_non_embedding"] == 124_439_808 - 50257 * 768 - 1024 * 768
    # 6 x (non-embedding + LM head matmul) + 12 L C T
    assert gpt2["flops_per_token"] == 6 * (85_056_000 + 50257 * 768) + 12 * 12 * 768 * 1024
    seed = json.loads(run("info", "--json").stdout)
    assert seed["n_params"] == 163_009_536
    assert seed["config"]["model"]["weight_tying"] is False
    # gpt2's matmuls less its qkv biases: the untied head is one LM head product too, counted once (it was twice)
    assert seed["flops_per_token"] == 6 * (85_056_000 - 12 * 3 * 768 + 50257 * 768) + 12 * 12 * 768 * 1024


def test_generate_num_samples_decodes_them_together_and_seeds_each(tmp_path):
    """--num-samples N: N samples (one batch), the first streamed; with --seed S, sample i is --seed S+i-1's."""
    config = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    folder = str(write_random_model(tmp_path / "model", config))
    flags = ["--prompt", "To be", "--max-new-tokens", "12", "--top-k", "50"]
    three = run("generate", folder, *flags, "--num-samples", "3", "--seed", "5")
    assert three.returncode == 0, three.stderr
    samples = three.stdout.split("--- sample ")[1:]
    assert [sample.split(" ---\n")[0] for sample in samples] == ["1", "2", "3"]
    texts = [sample.split(" ---\n", 1)[1] for sample in samples]
    assert all(text.startswith("To be") for text in texts) and len(set(texts)) == 3
    alone = run("generate", folder, *flags, "--seed", "6")
    assert alone.returncode == 0 and alone.stdout == texts[1], alone.stderr


def test_info_text_and_overrides(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[model]\nn_layers = 2\n")
    result = run("info", "--preset", "tiny", "--config", str(config), "--emb-dim", "32", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "training memory (micro-batch 4 x 64" in result.stdout
    assert "emb_dim          32" in result.stdout


def test_invalid_config_is_one_line_on_stderr():
    result = run("info", "--emb-dim", "100")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "gpt2scratch info: error: emb_dim (100) must be divisible by n_heads (12); change one of them, e.g. emb_dim=96"
    )
    assert "Traceback" not in result.stderr


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0 and "info" in result.stdout


def test_missing_optional_libraries_name_the_extra(tmp_path, monkeypatch, caplog):
    """fastapi/uvicorn (`serve`) and matplotlib (`plot`) are extras: without them, a message names the extra."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # an import of it now raises ImportError
    with pytest.raises(ValueError, match=r"serving needs uvicorn, .*pip install 'gpt2scratch\[serve\]'"):
        require_serving_libraries()
    monkeypatch.delitem(sys.modules, "uvicorn")
    # installed, but one of its own dependencies is not (fastapi 0.165 without opentelemetry-api, seen on a GPU
    # machine): the message names what failed rather than calling fastapi missing
    (tmp_path / "fastapi").mkdir()
    (tmp_path / "fastapi" / "__init__.py").write_text("import opentelemetry_not_installed_here\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "fastapi", raising=False)
    with pytest.raises(ValueError, match=r"but fastapi \(No module named 'opentelemetry_not_installed_here'\) failed"):
        require_serving_libraries()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    logger = MetricsLogger(tmp_path, enabled=True)
    record = {"step": 1, "val_loss": 1.0, "val_ppl": 2.7, "val_bpb": 1.4, "val_tokens": 10}
    logger.open(total=1, initial=0)
    logger.log_eval(record, [record], 1.0)
    logger.log_eval(record, [record], 1.0)
    logger.close()
    warning = "loss.png is not drawn: matplotlib is not installed (pip install 'gpt2scratch[plot]')"
    assert caplog.text.count(warning) == 1
    assert not (tmp_path / "loss.png").exists() and (tmp_path / "metrics.jsonl").is_file()
