"""Configuration: the seed's GPTConfig and TrainingConfig, named presets, and how a run's config is resolved.

Dataclasses are the single source of truth. A run's config is resolved as
    defaults < preset < config file (JSON or TOML) < command-line overrides
and an unknown key at any level is an error. The resolved `Config` is one object: it is logged at start,
written next to the run and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # a target that does not count in the loss (PyTorch's and HF's convention)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class GPTConfig:
    """Shape of the model. Defaults are the seed's (GPT-2 124M shapes, untied head, no qkv bias)."""

    vocab_size: int = field(default=50257, metadata=_help("vocabulary size (GPT-2 BPE: 50257)"))
    context_length: int = field(default=1024, metadata=_help("maximum sequence length (learned positions)"))
    emb_dim: int = field(default=768, metadata=_help("embedding width"))
    n_heads: int = field(default=12, metadata=_help("attention heads per layer"))
    n_layers: int = field(default=12, metadata=_help("transformer blocks"))
    drop_rate: float = field(default=0.1, metadata=_help("dropout on embeddings, attention and residuals"))
    qkv_bias: bool = field(default=False, metadata=_help("bias on the query/key/value projection"))
    weight_tying: bool = field(default=False, metadata=_help("share the token embedding with the LM head"))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            require_positive_int(self, name)
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                f"change one of them, e.g. emb_dim={self.n_heads * max(1, round(self.emb_dim / self.n_heads))}"
            )
        require_number(self, "drop_rate")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate ({self.drop_rate}) must be in [0, 1); use 0.0 to turn dropout off")
        for name in ("qkv_bias", "weight_tying"):
            require_bool(self, name)


@dataclass
class TrainingConfig:
    """Optimisation and sampling settings. Defaults are the seed's (GPT-3 small schedule, as in build-nanogpt)."""

    max_steps: int = field(default=19073, metadata=_help("optimizer steps in the whole run"))
    warmup_steps: int = field(default=715, metadata=_help("linear learning-rate warm-up steps"))
    max_lr: float = field(default=6e-4, metadata=_help("peak learning rate, reached after warm-up"))
    min_lr: float = field(default=6e-5, metadata=_help("final learning rate of the cosine decay"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay on matrices"))
    batch_size: int = field(default=2, metadata=_help("micro-batch size in sequences"))
    max_new_token: int = field(default=50, metadata=_help("tokens generated per sample"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature (0 = greedy)"))
    k_top: int = field(default=50, metadata=_help("top-k sampling (0 = no top-k filter)"))
    save_path: str = field(default=".", metadata=_help("folder of the run; checkpoints go to SAVE_PATH/ckpt"))
    # Beyond the seed: the rest of build-nanogpt's recipe and what a run needs.
    tokens_per_step: int = field(
        default=524288, metadata=_help("tokens per optimizer step (2^19), reached by gradient accumulation")
    )
    grad_clip: float = field(default=1.0, metadata=_help("clip the gradient norm to this (0 = off)"))
    beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    beta2: float = field(default=0.95, metadata=_help("AdamW beta2"))
    eval_every: int = field(default=250, metadata=_help("validate every N steps (0 = only at the end)"))
    eval_tokens: int = field(default=0, metadata=_help("val tokens per evaluation (0 = the whole val split)"))
    eval_hellaswag_every: int = field(
        default=0, metadata=_help("also score HellaSwag every N steps, at an evaluation (0 = off)")
    )
    hellaswag_file: str = field(default="", metadata=_help("hellaswag_val.jsonl (default: download it, online)"))
    hellaswag_limit: int = field(default=0, metadata=_help("HellaSwag examples in training evals (0 = all)"))
    sample_every: int = field(default=500, metadata=_help("print a sample every N steps (0 = only at the end)"))
    save_every: int = field(default=1000, metadata=_help("checkpoint every N steps (0 = only at the end)"))
    keep_last: int = field(default=2, metadata=_help("checkpoints kept, besides the best by val loss"))
    log_every: int = field(default=10, metadata=_help("print a log line every N steps"))
    seed: int = field(default=1337, metadata=_help("seed of initialisation, data order and dropout"))
    time_budget: float = field(
        default=0.0, metadata=_help("train for this many minutes, max_steps fitted to it (0 = off)")
    )
    budget_extends: bool = field(
        default=True,
        metadata=_help(
            "with a time budget: max_steps may grow to fill it (off: the budget only shortens the run, for a "
            "max_steps sized to the data)"
        ),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    precision: str = field(default="auto", metadata=_help("auto, fp32, bf16 or fp16 (autocast)"))
    compile: str = field(default="auto", metadata=_help("torch.compile: auto (on for CUDA), on or off"))
    fsdp: bool = field(default=False, metadata=_help("shard the model with FSDP2 instead of DDP (torchrun)"))
    # Speed (GPU users' usual switches; each default is the fast one where it is safe).
    tf32: bool = field(default=True, metadata=_help("TF32 for fp32 matmuls on NVIDIA GPUs"))
    fused_adamw: bool = field(default=True, metadata=_help("the fused AdamW kernel (CUDA, CPU); off: foreach"))
    pad_vocab: int = field(
        default=64,
        metadata=_help(
            "pad the embedding and LM head to a multiple of this many rows for faster matmuls (1 = off); "
            "logits, checkpoints and exports keep vocab_size"
        ),
    )
    activation_checkpointing: bool = field(
        default=False, metadata=_help("recompute each block in the backward pass: less memory, a third more compute")
    )
    peak_tflops: float = field(
        default=0.0, metadata=_help("peak bf16 TFLOP/s of one device, for MFU (0 = look up the GPU by its name)")
    )
    early_stop: int = field(
        default=0,
        metadata=_help(
            "stop when val loss has not improved for N evaluations in a row (0 = off); on a wsd schedule, before its "
            "decay, begin the decay there instead"
        ),
    )
    # Optimizer and schedule beyond the seed's (AdamW, warm-up + cosine).
    optimizer: str = field(
        default="adamw",
        metadata=_help("adamw, or muon: Muon for the blocks' weight matrices, AdamW for embeddings, head, gains"),
    )
    muon_lr: float = field(
        default=0.0, metadata=_help("peak learning rate of Muon's matrices (0 = max_lr: RMS matched to AdamW's)")
    )
    schedule: str = field(
        default="cosine", metadata=_help("cosine (warm-up, cosine to min_lr) or wsd (warm-up, stable, linear to 0)")
    )
    decay_fraction: float = field(default=0.2, metadata=_help("wsd: the last fraction of the steps that decays"))

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "max_new_token", "log_every", "keep_last"):
            require_positive_int(self, name)
        for name in (
            "tokens_per_step",
            "eval_every",
            "eval_tokens",
            "sample_every",
            "save_every",
            "seed",
            "eval_hellaswag_every",
            "hellaswag_limit",
            "early_stop",
        ):
            require_int(self, name)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        for name in ("grad_clip", "beta1", "beta2", "time_budget"):
            require_number(self, name)
        if self.grad_clip < 0 or self.time_budget < 0:
            raise ValueError("grad_clip and time_budget must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 ({self.beta1}) and beta2 ({self.beta2}) must be in [0, 1)")
        require_choice(self, "device", None, pattern=r"auto|cpu|mps|cuda(:\d+)?")
        require_choice(self, "precision", ("auto", "fp32", "bf16", "fp16"))
        require_choice(self, "compile", ("auto", "on", "off"))
        require_choice(self, "optimizer", ("adamw", "muon"))
        require_choice(self, "schedule", ("cosine", "wsd"))
        for name in ("muon_lr", "decay_fraction"):
            require_number(self, name)
        if self.muon_lr < 0 or not 0 < self.decay_fraction <= 1:
            raise ValueError(
                f"muon_lr ({self.muon_lr}) must be >= 0 and decay_fraction ({self.decay_fraction}) in (0, 1]"
            )
        for name in ("fsdp", "tf32", "fused_adamw", "activation_checkpointing"):
            require_bool(self, name)
        require_positive_int(self, "pad_vocab")
        require_number(self, "peak_tflops")
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops ({self.peak_tflops}) must be >= 0 (0 = from the GPU's name)")
        for name in ("warmup_steps", "k_top"):
            require_int(self, name)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps}); "
                "lower warmup_steps or raise max_steps"
            )
        for name in ("max_lr", "min_lr", "weight_decay", "temperature"):
            require_number(self, name)
        if self.max_lr <= 0:
            raise ValueError(f"max_lr ({self.max_lr}) must be > 0")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be in [0, max_lr={self.max_lr}]")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature ({self.temperature}) must be >= 0 (0 means greedy)")
        if not isinstance(self.save_path, str) or not self.save_path:
            raise ValueError(f"save_path ({self.save_path!r}) must be a non-empty path")


def due(every: int, step: int, last: bool = False) -> bool:
    """The one cadence rule of a run: an `*_every` interval is due every `every` steps (0 = never) and at the last."""
    return last or (every > 0 and step % every == 0)


@dataclass(frozen=True)
class Sampling:
    """How text is sampled. The seed names these settings `max_new_token`, `temperature` and `k_top` in its
    TrainingConfig; `from_training` is the one place they become the names generation, the server and
    Hugging Face's generation_config use. The defaults are the seed's."""

    max_new_tokens: int = TrainingConfig.max_new_token
    temperature: float = TrainingConfig.temperature
    top_k: int = TrainingConfig.k_top
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k"):
            require_int(self, name)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        require_number(self, "temperature")
        require_number(self, "top_p")
        if self.temperature < 0:
            raise ValueError(f"temperature ({self.temperature}) must be >= 0 (0 means greedy)")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p}) must be in [0, 1] (1 = off, 0 = greedy)")

    @classmethod
    def from_training(cls, training: TrainingConfig) -> Sampling:
        return cls(max_new_tokens=training.max_new_token, temperature=training.temperature, top_k=training.k_top)


@dataclass
class DataConfig:
    """Where the training tokens come from."""

    dir: str = field(
        default="auto",
        metadata=_help(
            "prepared data folder; auto = the embedded corpus in data/shakespeare[-bpeN], prepared if missing"
        ),
    )
    tokenizer: str = field(
        default="auto", metadata=_help("tokenizer when the embedded corpus is prepared: gpt2, bpe:N, or auto")
    )

    def __post_init__(self) -> None:
        if not isinstance(self.dir, str) or not self.dir:
            raise ValueError(f"dir ({self.dir!r}) must be a folder made by `gpt2scratch prepare`, or auto")
        require_choice(self, "tokenizer", None, pattern=r"auto|gpt2|bpe:\d+")


@dataclass
class Config:
    """One run's resolved configuration: the model's shape, how it is trained, and on what data."""

    model: GPTConfig = field(default_factory=GPTConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from `{"model": {...}, "training": {...}}`; unknown sections or keys are errors."""
        return merge(cls(), data, source="config")


SECTIONS: dict[str, type] = {"model": GPTConfig, "training": TrainingConfig, "data": DataConfig}

# The cadence of a small CPU run: its steps take milliseconds, not seconds.
_SMALL_RUN = {"eval_every": 250, "sample_every": 500, "save_every": 250, "log_every": 20}
# OpenAI's released shapes: their checkpoints have qkv bias and a tied LM head.
_OPENAI = {"vocab_size": 50257, "context_length": 1024, "qkv_bias": True, "weight_tying": True}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The seed's GPTConfig and TrainingConfig as they are: GPT-2 124M shapes, 2^19 tokens per step, 19,073 steps.
    "seed": {},
    "gpt2": {"model": {**_OPENAI, "n_layers": 12, "n_heads": 12, "emb_dim": 768}},
    "gpt2-medium": {"model": {**_OPENAI, "n_layers": 24, "n_heads": 16, "emb_dim": 1024}},
    "gpt2-large": {"model": {**_OPENAI, "n_layers": 36, "n_heads": 20, "emb_dim": 1280}},
    "gpt2-xl": {"model": {**_OPENAI, "n_layers": 48, "n_heads": 25, "emb_dim": 1600}},
    # Small shapes for CPU work, each with a schedule sized for it (the seed's 2^19 tokens per step and 715-step
    # warm-up are GPT-2 124M's): `tiny` trains in seconds (for checks); `mini` and `small` learn real text.
    "tiny": {
        "model": {"n_layers": 2, "n_heads": 2, "emb_dim": 64, "context_length": 64, "drop_rate": 0.0},
        "training": {
            **_SMALL_RUN,
            "batch_size": 32,
            "tokens_per_step": 2048,
            "max_lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 20,
            "max_steps": 500,
            "eval_every": 100,
            "sample_every": 250,
            "save_every": 100,
        },
    },
    "mini": {
        "model": {"n_layers": 4, "n_heads": 4, "emb_dim": 128, "context_length": 128, "drop_rate": 0.0},
        "training": {
            **_SMALL_RUN,
            "batch_size": 16,
            "tokens_per_step": 4096,
            "max_lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 50,
            "max_steps": 2000,
        },
    },
    "small": {
        "model": {"n_layers": 6, "n_heads": 6, "emb_dim": 384, "context_length": 256, "drop_rate": 0.1},
        "training": {
            **_SMALL_RUN,
            "batch_size": 8,
            "tokens_per_step": 16384,
            "max_lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "max_steps": 5000,
        },
    },
    # The CPU default of `train --preset auto` (and so of `python main.py`): on 2 cores a larger model sees too
    # few tokens in 8 minutes; this size learned the most in that time, and Muon + WSD learned more per minute
    # than AdamW + cosine (README, "The default run" and "Optimizer and schedule").
    "cpu": {
        "model": {"n_layers": 4, "n_heads": 4, "emb_dim": 128, "context_length": 256, "drop_rate": 0.0},
        "training": {
            "optimizer": "muon",
            "muon_lr": 6e-3,
            "schedule": "wsd",
            "batch_size": 16,
            "tokens_per_step": 4096,
            "max_lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 50,
            "max_steps": 2000,
            "eval_every": 100,
            "sample_every": 500,
            "save_every": 200,
            "log_every": 50,
            "time_budget": 8.0,
        },
        # 16384 tokens: each covers more text (3.6 bytes, where 8192 tokens cover 3.4 and 4096 tokens 3.1); in the
        # 8-minute search it learned the most of the tokenizers, shapes and batches tried (README, "Optimizer and
        # schedule").
        "data": {"tokenizer": "bpe:16384"},
    },
    # The GPU default of `train --preset auto`: the embedded corpus (about 1.58 M training tokens with this BPE) is
    # what limits a GPU, not compute, so the model is sized for the data (nanoGPT's Shakespeare shape, dropout 0.2),
    # and so is the run: 1,000 steps (about 10 passes over the text), the length of this recipe that ended lowest
    # on an H200 (750 to 1,500 tried; longer runs memorise in the stable phase). Muon + WSD reached a lower val loss
    # there than AdamW + cosine (README, "Training on GPUs"). The 5-minute budget only shortens the run on slower
    # GPUs; early_stop begins the decay if the val loss stalls before it, and ends the run if it stalls after.
    "gpu": {
        "model": {"n_layers": 6, "n_heads": 6, "emb_dim": 384, "context_length": 256, "drop_rate": 0.2},
        "training": {
            "optimizer": "muon",
            "muon_lr": 2e-3,
            "schedule": "wsd",
            "batch_size": 64,
            "tokens_per_step": 16384,
            "max_lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "max_steps": 1000,
            "budget_extends": False,
            "eval_every": 100,
            "sample_every": 1000,
            "save_every": 500,
            "log_every": 100,
            "time_budget": 5.0,
            "early_stop": 3,
        },
        "data": {"tokenizer": "bpe:4096"},
    },
}


def merge(config: Config, data: dict[str, Any], source: str) -> Config:
    """Return `config` with the values in `data` (`{section: {key: value}}`) applied and validated."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of sections {sorted(SECTIONS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known sections are {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        current = dataclasses.asdict(getattr(config, name))
        updates = data.get(name, {})
        if not isinstance(updates, dict):
            raise ValueError(f"{source}: section '{name}' must be a mapping, got {type(updates).__name__}")
        unknown = sorted(set(updates) - set(current))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in section '{name}'; known keys: {sorted(current)}")
        updates = _coerce(cls, updates)
        if name == "training":
            updates = _scale_warmup(current, updates, source)
        sections[name] = cls(**{**current, **updates})
    return Config(**sections)


def _scale_warmup(current: dict[str, Any], updates: dict[str, Any], source: str) -> dict[str, Any]:
    """A max_steps set below the warm-up (with no warmup_steps beside it) keeps the warm-up's share of the run,
    as --time-budget does: the seed's 715 of 19073 steps become 1 of 40 with --max-steps 40."""
    max_steps, warmup = updates.get("max_steps"), current["warmup_steps"]
    if "warmup_steps" in updates or not isinstance(max_steps, int) or max_steps <= 0 or max_steps >= warmup:
        return updates
    scaled = min(warmup, round(max_steps * warmup / current["max_steps"]))
    log.info(
        f"{source}: max_steps {max_steps} is below warmup_steps {warmup}; warm-up scaled to {scaled} steps "
        f"(its share of the {current['max_steps']} steps before); set warmup_steps to choose another"
    )
    return {**updates, "warmup_steps": scaled}


def _coerce(cls: type, updates: dict[str, Any]) -> dict[str, Any]:
    """Accept ints where floats are expected (JSON/TOML write 1 for 1.0)."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return {
        key: float(value) if types[key] == "float" and type(value) is int else value for key, value in updates.items()
    }


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into `{section: {key: value}}` (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {reason}") from None
    raise ValueError(f"config file {path} must end in .json or .toml")


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """defaults < preset < config file < overrides, each layer validated as it is applied."""
    config = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        config = merge(config, PRESETS[preset], source=f"preset {preset}")
    if config_file is not None:
        config = merge(config, load_config_file(config_file), source=str(config_file))
    if overrides:
        config = merge(config, overrides, source="command line")
    return config


def require_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be an integer")


def require_positive_int(obj: Any, name: str) -> None:
    require_int(obj, name)
    if getattr(obj, name) <= 0:
        raise ValueError(f"{name} ({getattr(obj, name)}) must be a positive integer")


def require_number(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} ({value!r}) must be a finite number")


def require_choice(obj: Any, name: str, choices: tuple[str, ...] | None, pattern: str | None = None) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, str) and (value in choices if choices else re.fullmatch(pattern, value) is not None)
    if not ok:
        allowed = ", ".join(choices) if choices else pattern.replace("\\d+", "N").replace("|", ", ")
        raise ValueError(f"{name} ({value!r}) must be one of: {allowed}")


def require_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be true or false")
