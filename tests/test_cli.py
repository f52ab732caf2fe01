"""The command line, run as a user runs it (a subprocess), for `info`."""

import json

from gpt2scratch.testing import run_cli as run


def test_info_json_gpt2_and_seed_default():
    gpt2 = json.loads(run("info", "--preset", "gpt2", "--json").stdout)
    assert gpt2["n_params"] == 124_439_808
    assert gpt2["n_params_non_embedding"] == 124_439_808 - 50257 * 768 - 1024 * 768
    # 6 x (non-embedding + LM head matmul) + 12 L C T
    assert gpt2["flops_per_token"] == 6 * (85_056_000 + 50257 * 768) + 12 * 12 * 768 * 1024
    seed = json.loads(run("info", "--json").stdout)
    assert seed["n_params"] == 163_009_536
    assert seed["config"]["model"]["weight_tying"] is False


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
