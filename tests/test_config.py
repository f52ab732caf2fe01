"""Config: the seed's defaults, presets, precedence, and one clear error per invalid value."""

import json

import pytest

from gpt2scratch.config import PRESETS, Config, GPTConfig, TrainingConfig, resolve_config


def test_seed_defaults():
    """Failure means a default drifted from SEED.md."""
    model, training = GPTConfig(), TrainingConfig()
    assert (model.vocab_size, model.context_length, model.emb_dim) == (50257, 1024, 768)
    assert (model.n_heads, model.n_layers, model.drop_rate) == (12, 12, 0.1)
    assert (model.qkv_bias, model.weight_tying) == (False, False)
    assert (training.max_steps, training.warmup_steps) == (19073, 715)
    assert (training.max_lr, training.min_lr, training.weight_decay) == (6e-4, 6e-5, 0.1)
    assert (training.batch_size, training.max_new_token, training.temperature, training.k_top) == (2, 50, 1, 50)
    assert training.save_path == "."


def test_openai_presets():
    shapes = {name: (c.n_layers, c.n_heads, c.emb_dim) for name in PRESETS if (c := resolve_config(name).model)}
    assert shapes["gpt2"] == (12, 12, 768)
    assert shapes["gpt2-medium"] == (24, 16, 1024)
    assert shapes["gpt2-large"] == (36, 20, 1280)
    assert shapes["gpt2-xl"] == (48, 25, 1600)
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        model = resolve_config(name).model
        assert model.qkv_bias and model.weight_tying and model.vocab_size == 50257 and model.context_length == 1024


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_precedence_defaults_preset_file_overrides(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"model": {"n_layers": 3, "emb_dim": 96}, "training": {"max_lr": 1}}))
    else:
        path.write_text("[model]\nn_layers = 3\nemb_dim = 96\n[training]\nmax_lr = 1\n")
    config = resolve_config("mini", path, {"model": {"n_layers": 5}})
    assert config.model.n_layers == 5  # command line beats file
    assert config.model.emb_dim == 96  # file beats preset
    assert config.model.n_heads == 4  # preset beats default
    assert config.training.max_lr == 1.0 and isinstance(config.training.max_lr, float)
    assert config.training.max_steps == 2000  # the preset's schedule (issue 12: small presets carry their own)
    assert config.training.weight_decay == 0.1  # default


def test_round_trip_through_dict():
    config = resolve_config("gpt2", overrides={"training": {"batch_size": 8}})
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "data,message",
    [
        ({"modle": {}}, r"unknown section\(s\) \['modle'\]"),
        ({"model": {"n_layer": 3}}, r"unknown key\(s\) \['n_layer'\] in section 'model'"),
        ({"training": {"lr": 3}}, r"unknown key\(s\) \['lr'\]"),
        ({"model": []}, "section 'model' must be a mapping"),
    ],
)
def test_unknown_keys_are_errors(data, message):
    with pytest.raises(ValueError, match=message):
        Config.from_dict(data)


@pytest.mark.parametrize(
    "model,message",
    [
        ({"emb_dim": 100}, r"emb_dim \(100\) must be divisible by n_heads \(12\)"),
        ({"n_layers": 0}, r"n_layers \(0\) must be a positive integer"),
        ({"n_heads": -2}, r"n_heads \(-2\) must be a positive integer"),
        ({"vocab_size": 0}, r"vocab_size \(0\) must be a positive integer"),
        ({"context_length": 2.5}, r"context_length \(2.5\) must be an integer"),
        ({"emb_dim": True}, r"emb_dim \(True\) must be an integer"),
        ({"drop_rate": 1.0}, r"drop_rate \(1.0\) must be in \[0, 1\)"),
        ({"drop_rate": -0.1}, r"drop_rate \(-0.1\) must be in \[0, 1\)"),
        ({"drop_rate": float("nan")}, r"drop_rate \(nan\) must be a finite number"),
        ({"qkv_bias": 1}, r"qkv_bias \(1\) must be true or false"),
        ({"weight_tying": "yes"}, r"weight_tying \('yes'\) must be true or false"),
    ],
)
def test_model_validation(model, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**model)


@pytest.mark.parametrize(
    "training,message",
    [
        ({"max_steps": 0}, r"max_steps \(0\) must be a positive integer"),
        ({"batch_size": -1}, r"batch_size \(-1\) must be a positive integer"),
        ({"max_new_token": 0}, r"max_new_token \(0\) must be a positive integer"),
        ({"warmup_steps": -1}, r"warmup_steps \(-1\) must be >= 0"),
        ({"warmup_steps": 100, "max_steps": 10}, r"warmup_steps \(100\) must not exceed max_steps \(10\)"),
        ({"max_lr": 0.0}, r"max_lr \(0.0\) must be > 0"),
        ({"min_lr": 1.0}, r"min_lr \(1.0\) must be in \[0, max_lr=0.0006\]"),
        ({"weight_decay": -0.1}, r"weight_decay \(-0.1\) must be >= 0"),
        ({"temperature": -1.0}, r"temperature \(-1.0\) must be >= 0"),
        ({"k_top": -5}, r"k_top \(-5\) must be >= 0"),
        ({"save_path": ""}, r"save_path \(''\) must be a non-empty path"),
    ],
)
def test_training_validation(training, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**training)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_config(config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        resolve_config(config_file=bad)
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model: {}")
    with pytest.raises(ValueError, match="must end in .json or .toml"):
        resolve_config(config_file=yaml)
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        resolve_config("gpt3")


def test_max_steps_below_the_warmup_scales_the_warmup(caplog):
    """--max-steps under the warm-up keeps the warm-up's share of the run (as --time-budget does), and says so;
    a warm-up given beside it is the user's and is checked instead."""
    caplog.set_level("INFO")
    assert resolve_config(None, overrides={"training": {"max_steps": 40}}).training.warmup_steps == 1  # 715 / 19073
    assert "max_steps 40 is below warmup_steps 715; warm-up scaled to 1 steps" in caplog.text
    assert resolve_config("tiny", overrides={"training": {"max_steps": 10}}).training.warmup_steps == 0  # 20 / 500
    assert resolve_config(None, overrides={"training": {"max_steps": 1000}}).training.warmup_steps == 715
    with pytest.raises(ValueError, match=r"warmup_steps \(50\) must not exceed max_steps \(40\)"):
        resolve_config(None, overrides={"training": {"max_steps": 40, "warmup_steps": 50}})


@pytest.mark.parametrize("preset", ["tiny", "mini", "small"])
def test_small_presets_carry_a_schedule_sized_for_them(preset):
    """The seed's 2^19 tokens per step and 715 warm-up steps are GPT-2 124M's; a CPU preset has its own."""
    config = resolve_config(preset)
    t = config.training
    assert t.tokens_per_step <= 16384 and t.tokens_per_step % (t.batch_size * config.model.context_length) == 0
    assert t.warmup_steps <= t.max_steps // 10 and t.eval_every <= t.max_steps // 2
