"""Open a model for use (generation, export, evaluation): from a training checkpoint, a run folder, a folder
written by `import`, a Hugging Face folder, or (online) a Hugging Face hub name.

    checkpoint folder   RUN/ckpt/step_000500 (model.safetensors + state.json + tokenizer/)
    run folder          RUN, or RUN/ckpt: its latest checkpoint
    Hugging Face folder config.json + model.safetensors (or pytorch_model.bin) + vocab.json + merges.txt
    hub name            gpt2, gpt2-medium, openai-community/gpt2-large, ... (downloaded once, then cached)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2scratch import checkpoint, hf
from gpt2scratch.config import Config, GPTConfig, TrainingConfig
from gpt2scratch.dataset.tokenizer import Tokenizer
from gpt2scratch.models import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: Config  # model shape and, for a training checkpoint, its sampling defaults
    source: Path  # the folder the weights came from
    tokenizer_dir: Path
    dtype: str = "fp32"  # what it decodes in (quantization.py)


def resolve(path_or_name: str) -> Path:
    """The folder that holds the weights; a hub name is downloaded (and fails at once offline)."""
    path = Path(path_or_name)
    if path.is_dir():
        if (path / "state.json").is_file() or hf.is_hf_folder(path):
            return path
        for root in (path / checkpoint.CKPT_DIR, path):
            latest = checkpoint.latest(root)
            if latest is not None:
                return latest
        raise ValueError(
            f"{path} holds no model: expected a training checkpoint (state.json + model.safetensors), a run "
            "folder with ckpt/, or a Hugging Face folder (config.json + model.safetensors)"
        )
    if path.exists() or path_or_name.startswith((".", "/", "~")) or path_or_name.count("/") > 1:
        raise ValueError(f"{path} is not a folder; pass a checkpoint, run or Hugging Face folder")
    return hf.download(path_or_name)


def load(path_or_name: str, device: str | torch.device = "cpu", dtype: str = "fp32") -> LoadedModel:
    """The model at `path_or_name` on `device`, in eval mode, for decoding in `dtype` (fp32, bf16, int8,
    int8-dynamic or auto: see quantization.py)."""
    from gpt2scratch.quantization import apply_dtype, pick_dtype

    dtype, _ = pick_dtype(dtype, torch.device(device))
    source = resolve(path_or_name)
    if (source / "state.json").is_file():
        state = checkpoint.read_state(source).state
        try:
            config = Config.from_dict(state["config"])
        except ValueError as error:
            raise ValueError(f"{source / 'state.json'}: {error}") from None
        shapes = checkpoint.safetensors_shapes(source / "model.safetensors")
        if "lm_head.weight" not in shapes:  # a tied head is stored once
            shapes["lm_head.weight"] = shapes.get("transformer.wte.weight", ())
        checkpoint.check_config_fits(config.model, shapes, source)
        weights = checkpoint.load_model_state(source)
        tokenizer_dir = source / "tokenizer"
        if not (tokenizer_dir / "vocab.json").is_file():  # checkpoints of before tokenizer/ was saved in them
            tokenizer_dir = Path(config.data.dir) / "tokenizer"
    else:
        model_config, weights = hf.load_folder(source)
        config = Config(model=model_config, training=TrainingConfig())
        tokenizer_dir = source
    tokenizer = Tokenizer(tokenizer_dir)
    tokenizer_dir = tokenizer.directory  # vocab.json + merges.txt (made from tokenizer.json if need be)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size ({config.model.vocab_size})"
        )
    model = apply_dtype(build(config.model, weights, device), dtype)
    return LoadedModel(model, tokenizer, config, source, tokenizer_dir, dtype)


def build(model_config: GPTConfig, weights: dict[str, torch.Tensor], device="cpu") -> GPT:
    """A GPT with these weights (strict: every parameter present, with its shape), in eval mode."""
    model = GPT(model_config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"the weights do not fit the model's config: {error}") from None
    if model_config.weight_tying:
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(device).eval()
