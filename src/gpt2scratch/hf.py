"""Conversion between this project's GPT and Hugging Face `transformers.GPT2LMHeadModel`.

The parameter names are the same on both sides (they are GPT-2's); what differs is that HF stores the four
attention/MLP projections as `Conv1D` with the weight transposed, (in, out) instead of nn.Linear's (out, in),
and that HF always has a qkv bias (zeros where our model has none). `transformers` is imported lazily.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from gpt2scratch.config import GPTConfig
from gpt2scratch.models.layer_norm import LAYER_NORM_EPS

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older HF checkpoints, not parameters


def hf_config_dict(config: GPTConfig) -> dict:
    """The fields of transformers' GPT2Config that describe `config`."""
    return {
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # tanh-approximated GELU
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
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
        vocab_size=get("vocab_size"),
        context_length=get("n_positions"),
        emb_dim=get("n_embd"),
        n_heads=get("n_head"),
        n_layers=get("n_layer"),
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
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
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
    model,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    top_k: int = 50,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
) -> Path:
    """Write a folder that `GPT2LMHeadModel.from_pretrained` and `GPT2Tokenizer.from_pretrained` load.

    config.json + model.safetensors (via transformers, so the format is the one it reads), generation_config.json
    with the run's sampling defaults, and the tokenizer both as vocab.json + merges.txt (what transformers 4.x's
    slow GPT2Tokenizer reads) and as tokenizer.json + tokenizer_config.json.
    """
    from transformers import GenerationConfig, GPT2TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = hf_model_from_gpt(model)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hf.config.bos_token_id = hf.config.eos_token_id = eot
    hf.generation_config = GenerationConfig(
        do_sample=True,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        temperature=temperature if temperature > 0 else 1.0,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    hf.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = model.config.context_length
    tokenizer.save_pretrained(out_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
