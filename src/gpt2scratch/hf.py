"""Conversion between this project's GPT and Hugging Face `transformers.GPT2LMHeadModel`.

The parameter names are the same on both sides (they are GPT-2's); what differs is that HF stores the four
attention/MLP projections as `Conv1D` with the weight transposed, (in, out) instead of nn.Linear's (out, in),
and that HF always has a qkv bias (zeros where our model has none). `transformers` is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt2scratch.config import GPTConfig, Sampling
from gpt2scratch.models.layer_norm import LAYER_NORM_EPS

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older HF checkpoints, not parameters


# Our GPTConfig field -> transformers' GPT2Config field: the one table both directions read.
HF_NAMES = {
    "vocab_size": "vocab_size",
    "context_length": "n_positions",
    "emb_dim": "n_embd",
    "n_layers": "n_layer",
    "n_heads": "n_head",
}
HF_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")  # our one drop_rate is all three of GPT2Config's


def hf_config_dict(config: GPTConfig) -> dict:
    """The fields of transformers' GPT2Config that describe `config`."""
    return {
        **{hf_name: getattr(config, name) for name, hf_name in HF_NAMES.items()},
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # tanh-approximated GELU
        **dict.fromkeys(HF_DROPOUTS, config.drop_rate),
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.weight_tying,
        "bos_token_id": config.vocab_size - 1,
        "eos_token_id": config.vocab_size - 1,
    }


def config_from_hf(hf_config) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config (or its dict); rejects what our model cannot represent."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda key, default=None: getattr(hf_config, key, default)
    activation = get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {activation!r} is not GPT-2's tanh GELU; this model cannot load it")
    if get("n_inner") not in (None, 4 * get("n_embd")):
        raise ValueError(f"n_inner ({get('n_inner')}) must be 4 * n_embd for a GPT-2 MLP")
    return GPTConfig(
        **{name: get(hf_name) for name, hf_name in HF_NAMES.items()},
        drop_rate=float(get("resid_pdrop", 0.1)),
        qkv_bias=True,
        weight_tying=bool(get("tie_word_embeddings", True)),
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> GPT2LMHeadModel's (contiguous tensors, safe for safetensors)."""
    out = {}
    for key, value in state.items():
        if key.endswith(TRANSPOSED):
            value = value.t()
        out[key] = value.detach().contiguous().clone()
    if not config.qkv_bias:
        for i in range(config.n_layers):
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(
                3 * config.emb_dim, dtype=state["lm_head.weight"].dtype
            )
    if config.weight_tying:
        out.pop("lm_head.weight", None)  # HF re-ties it to wte on load
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict -> ours. Prefixless (`h.0...`) base-model keys are accepted too."""
    out = {}
    for key, value in hf_state.items():
        if key.endswith(HF_BUFFERS):
            continue
        key = _our_name(key)
        if key.endswith(TRANSPOSED):
            value = value.t()
        out[key] = value.contiguous()
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    if not config.qkv_bias:
        for i in range(config.n_layers):
            bias = out.pop(f"transformer.h.{i}.attn.c_attn.bias", None)
            if bias is not None and bool(bias.any()):
                raise ValueError(f"layer {i} has a non-zero qkv bias, but the config says qkv_bias=False")
    return out


def hf_model_from_gpt(model) -> transformers.GPT2LMHeadModel:  # noqa: F821
    """A transformers GPT2LMHeadModel holding the same weights as our `model` (fp32, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(model.config)))
    result = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    missing = [key for key in result.missing_keys if key != "lm_head.weight" and not key.endswith(HF_BUFFERS)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"state dict conversion is incomplete: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if model.config.weight_tying:
        hf.tie_weights()
    return hf.eval()


def export_folder(
    model_state: dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    sampling: Sampling | None = None,
) -> Path:
    """Write a folder that transformers' `GPT2LMHeadModel.from_pretrained` and `GPT2Tokenizer.from_pretrained`
    load (4.x and 5.x): the files of OpenAI's `gpt2` hub folder, written here without transformers.

    config.json, model.safetensors (Conv1D weights transposed; zero qkv biases if the model has none),
    generation_config.json (sampling defaults: `sampling`), vocab.json + merges.txt (what the slow GPT2Tokenizer of 4.x
    reads), tokenizer.json + tokenizer_config.json (the fast tokenizer).
    """
    from safetensors.torch import save_file

    from gpt2scratch.dataset.tokenizer import EOT, Tokenizer

    sampling = sampling or Sampling()  # the seed's defaults
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(tokenizer_dir)
    eot = tokenizer.eot_id
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **hf_config_dict(config),
        "n_ctx": config.context_length,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
        # What GPT2Config cannot say; read back by `import`, ignored by transformers.
        "gpt2scratch": {"qkv_bias": config.qkv_bias},
    }
    _write_json(out_dir / "config.json", hf_config)
    tensors = {k: v.float() for k, v in to_hf_state_dict(model_state, config).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # No length here: transformers lets a generation_config's max_new_tokens override a caller's max_length, and
    # the seed's snippet asks for max_length=50 in all. Sampling defaults do not override explicit arguments.
    generation = {
        "do_sample": True,
        "top_k": sampling.top_k,
        "temperature": sampling.temperature if sampling.temperature > 0 else 1.0,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
    }
    _write_json(out_dir / "generation_config.json", generation)
    tokenizer.save(out_dir)
    tokenizer.hf_tokenizer().save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "model_max_length": config.context_length,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and any(
        (Path(path) / name).is_file() for name in (*WEIGHT_FILES, "model.safetensors.index.json")
    )


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_folder(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A Hugging Face GPT-2 folder -> (our config, our state dict). Weights are read with safetensors, or with
    torch.load(weights_only=True) for an old pytorch_model.bin: nothing in the folder is executed."""
    from safetensors.torch import load_file

    from gpt2scratch.checkpoint import check_config_fits, safetensors_shapes
    from gpt2scratch.dataset.shards import inside

    path = Path(path)
    hf_config = _read_json(path / "config.json")
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path} holds a {hf_config.get('model_type')!r} model; only GPT-2 models can be loaded")
    try:
        config = config_from_hf(hf_config)
        ours = hf_config.get("gpt2scratch", {})
        if isinstance(ours, dict) and "qkv_bias" in ours:
            config = GPTConfig(**{**config.__dict__, "qkv_bias": bool(ours["qkv_bias"])})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path / 'config.json'}: {error}") from None
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index_file = path / "model.safetensors.index.json"
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{index_file} has no weight_map of tensor names to file names")
        files = [inside(path, name, index_file) for name in sorted(set(weight_map.values()))]
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise ValueError(f"{path} has no model.safetensors or pytorch_model.bin")
    if files[0].suffix == ".safetensors":  # check the shapes in the headers before reading any tensor
        shapes = {_our_name(key): shape for file in files for key, shape in safetensors_shapes(file).items()}
        check_config_fits(config, shapes, path)
        hf_state = {}
        for file in files:
            try:
                hf_state.update(load_file(str(file)))
            except Exception as error:  # SafetensorError and friends: a damaged file
                raise ValueError(f"{file} is truncated or corrupt ({str(error).splitlines()[0]})") from None
    else:
        try:
            hf_state = torch.load(files[0], map_location="cpu", weights_only=True)
        except Exception as error:  # never unpickles code: weights_only refuses it
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{files[0]} cannot be read as weights ({first})") from None
        if not isinstance(hf_state, dict) or not all(isinstance(v, torch.Tensor) for v in hf_state.values()):
            raise ValueError(f"{files[0]} does not hold a state dict of tensors")
        check_config_fits(config, {_our_name(k): tuple(v.shape) for k, v in hf_state.items()}, path)
    return config, from_hf_state_dict({k: v.float() for k, v in hf_state.items()}, config)


def _our_name(key: str) -> str:
    """A Hugging Face GPT-2 key with our prefix (base-model checkpoints store `h.0...` without `transformer.`)."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{file} cannot be read ({error or 'nested too deeply'})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object")
    return data


HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json", "merges.txt", "*.txt"]


def download(name: str) -> Path:
    """A hub model (e.g. `gpt2`, `gpt2-medium`, `openai-community/gpt2-xl`) into the local HF cache; offline,
    a clear error at once."""
    from gpt2scratch.hub import unreachable_reason

    reason = unreachable_reason()
    if reason is not None:
        raise ValueError(
            f"{name} is not a local folder, and {reason}: it cannot be downloaded. Pass a folder that holds "
            "config.json and model.safetensors instead"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=HUB_FILES))
