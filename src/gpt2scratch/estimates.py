"""Sizes and costs of a model, computed from its GPTConfig alone (no weights are built, so gpt2-xl is instant).

- parameters: counted exactly as `GPT(config)` has them (a tied LM head counts once);
- non-embedding parameters: all minus the token and position embeddings (Kaplan et al.);
- training FLOPs per token: 6 x (matmul parameters) + 12 x n_layers x emb_dim x context_length, the
  PaLM-appendix formula that nanoGPT and llm.c use for MFU; the LM head is a matmul whether tied or not;
- training memory: a rough estimate (see `training_memory_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2scratch.config import GPTConfig


def n_params(config: GPTConfig) -> int:
    C, V, T, L = config.emb_dim, config.vocab_size, config.context_length, config.n_layers
    attention = 3 * C * C + (3 * C if config.qkv_bias else 0) + C * C + C
    mlp = 4 * C * C + 4 * C + 4 * C * C + C
    layer_norms = 2 * (2 * C)
    head = 0 if config.weight_tying else V * C
    return V * C + T * C + L * (attention + mlp + layer_norms) + 2 * C + head


def n_params_non_embedding(config: GPTConfig) -> int:
    return n_params(config) - config.vocab_size * config.emb_dim - config.context_length * config.emb_dim


def flops_per_token(config: GPTConfig) -> int:
    """Training (forward + backward) FLOPs per token at full context."""
    # the LM head is a matmul once, tied or not: an untied head is already among the non-embedding parameters
    head = config.vocab_size * config.emb_dim if config.weight_tying else 0
    matmul_params = n_params_non_embedding(config) + head
    attention = 12 * config.n_layers * config.emb_dim * config.context_length
    return 6 * matmul_params + attention


@dataclass
class MemoryEstimate:
    weights_and_optimizer: int  # fp32 weights + fp32 grads + AdamW's two moments: 16 bytes a parameter
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.activations + self.logits


def training_memory_bytes(config: GPTConfig, micro_batch: int, precision: str = "bf16") -> MemoryEstimate:
    """Peak training memory, roughly (expect +-30%; allocator overheads and compile workspaces not included).

    Activations follow Korthikanti et al. 2022 ("Reducing activation recomputation"): per block
    34 x B x T x C bytes at 16-bit with flash attention (no (T, T) scores kept); doubled at fp32.
    The logits add B x T x V x (activation bytes + 8) for the fp32 copy used by the loss and its gradient.
    """
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision ({precision!r}) must be bf16, fp16 or fp32")
    scale = 2 if precision == "fp32" else 1
    tokens = micro_batch * config.context_length
    activations = config.n_layers * 34 * tokens * config.emb_dim * scale
    logits = tokens * config.vocab_size * (2 * scale + 8)
    return MemoryEstimate(16 * n_params(config), activations, logits)
