"""The GPT-2 language model: token + learned position embeddings, n_layers pre-LN blocks, final LayerNorm, LM head.

Attribute names are those of the GPT-2 checkpoints (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...,
`lm_head`), so converting to and from Hugging Face is a transpose of four matrices, not a renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt2scratch.config import IGNORE_INDEX, GPTConfig
from gpt2scratch.models.dropout import Dropout
from gpt2scratch.models.kv_cache import KVCache
from gpt2scratch.models.layer_norm import LayerNorm
from gpt2scratch.models.linear_cross_entropy import fusable, linear_cross_entropy
from gpt2scratch.models.transformer_block import TransformerBlock

INIT_STD = 0.02  # GPT-2's initializer_range


class GPT(nn.Module):
    """pad_vocab > 1 gives the embedding and the LM head extra rows up to a multiple of it (50257 -> 50304 for
    pad_vocab 64), so the largest matmul has GPU-friendly shapes. The extra rows start at zero and stay there
    (no token looks them up, their logits are cut off before anything sees them, so their gradient is zero):
    logits, `state_dict()` and checkpoints have exactly vocab_size rows, and `load_state_dict` pads again.
    activation_checkpointing: recompute each block in the backward pass instead of keeping its activations."""

    def __init__(self, config: GPTConfig, attn_impl: str = "sdpa", pad_vocab: int = 1):
        super().__init__()
        self.config = config
        self.padded_vocab_size = math.ceil(config.vocab_size / pad_vocab) * pad_vocab
        self.activation_checkpointing = False
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.emb_dim),
                wpe=nn.Embedding(config.context_length, config.emb_dim),  # learned positions, trained from scratch
                drop=Dropout(config.drop_rate),
                h=nn.ModuleList(TransformerBlock(config, attn_impl) for _ in range(config.n_layers)),
                ln_f=LayerNorm(config.emb_dim),
            )
        )
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)  # GPT-2: no bias on the LM head
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2 * n_layers):
        # two such writes (attention, MLP) per block, so the stream's variance does not grow with depth.
        residual_std = INIT_STD / math.sqrt(2 * config.n_layers)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)
        if self.padded_vocab_size != config.vocab_size:  # after the init: the same weights as unpadded
            self._pad_vocab()
        if config.weight_tying:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Normal(0, 0.02) for every matrix and both embeddings (not PyTorch's uniform defaults); zero biases.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def _pad_vocab(self) -> None:
        """Zero rows appended to the embedding and the LM head, up to padded_vocab_size."""
        for module in (self.transformer.wte, self.lm_head):
            weight = module.weight.data
            padding = weight.new_zeros(self.padded_vocab_size - weight.size(0), weight.size(1))
            module.weight = nn.Parameter(torch.cat([weight, padding]))
        self.transformer.wte.num_embeddings = self.lm_head.out_features = self.padded_vocab_size
        self.register_state_dict_post_hook(_unpad_state)
        self.register_load_state_dict_pre_hook(_pad_state)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        pad_lengths: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy over targets or None).

        targets: (B, T), already shifted (targets[:, t] is the token after idx[:, t]); IGNORE_INDEX is skipped.
        caches: one KVCache per layer for incremental decoding; positions continue after what they hold.
        pad_lengths: (B,) for a batch of prompts of different lengths, left-padded: row b's first pad_lengths[b]
            tokens are padding, masked out of attention, and its positions start at 0 after them.
        last_only: logits of the last position only, (B, 1, vocab_size): what decoding needs after a prompt (the LM
            head, a third of GPT-2 124M's weights, then skips the prompt's other positions).
        return_logits=False with targets: the loss only (logits None), on a CPU through linear_cross_entropy, which
            never keeps the logits in fp32: what training asks for (a compiled model fuses the plain loss itself).
        """
        if last_only and targets is not None:
            raise ValueError("last_only gives the last position's logits only: a loss over targets needs them all")
        past = caches[0].length if caches else 0
        if past == 0 and not torch.compiler.is_compiling():  # later decoding steps feed back the model's own ids
            self.check_input(idx, past)
        elif past + idx.size(1) > self.config.context_length:
            raise ValueError(f"the KV cache holds {past} tokens; {idx.size(1)} more exceed the context length")
        B, T = idx.size()
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        if pad_lengths is not None:
            pos = (pos[None, :] - pad_lengths[:, None]).clamp(min=0)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and caches is None:
                x = checkpoint(block, x, pad_lengths=pad_lengths, use_reentrant=False)
            else:
                x = block(x, cache=caches[i] if caches else None, pad_lengths=pad_lengths)
        if last_only:
            x = x[:, -1:, :]
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits and fusable(x):
            loss = linear_cross_entropy(
                x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), self.config.vocab_size
            )
            return None, loss
        logits = self.lm_head(x)  # (B, T, padded_vocab_size)
        if self.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits if return_logits else None, loss

    def check_input(self, idx: torch.Tensor, past: int = 0) -> None:
        """Raise a ValueError that names the problem if idx is not (B, T) token ids that fit the model after `past`
        cached positions (what forward checks before a prompt; a compiled caller checks it itself)."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx must be a (batch, time) tensor of integer token ids, got {tuple(idx.shape)} {idx.dtype}"
            )
        T = idx.size(1)
        if past + T > self.config.context_length:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the context length ({self.config.context_length}); "
                "crop the input to its last context_length tokens"
            )
        if idx.numel() == 0:
            return
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]; "
                "was the text encoded with a different tokenizer than the model's?"
            )

    def new_kv_caches(self, max_len: int | None = None) -> list[KVCache]:
        """Empty per-layer caches for incremental decoding of up to max_len (default: context) positions."""
        return [KVCache(max_len or self.config.context_length) for _ in range(self.config.n_layers)]

    def num_params(self) -> int:
        """Parameters counted once each (a tied head is not counted twice), padding rows not counted; for a model
        converted to bf16 / int8 weights (quantization.py), those of the model it was made from."""
        if hasattr(self, "decoded_params"):
            return self.decoded_params
        padding = (self.padded_vocab_size - self.config.vocab_size) * self.config.emb_dim
        heads = 1 if self.config.weight_tying else 2
        return sum(p.numel() for p in self.parameters()) - heads * padding


_PADDED = ("transformer.wte.weight", "lm_head.weight")


def _unpad_state(model: GPT, state: dict, prefix: str, local_metadata) -> None:
    """state_dict() holds vocab_size rows of the padded matrices (views: no copy)."""
    for name in _PADDED:
        if prefix + name in state:
            state[prefix + name] = state[prefix + name][: model.config.vocab_size]


def _pad_state(model: GPT, state: dict, prefix: str, local_metadata, strict, missing, unexpected, errors) -> None:
    """load_state_dict() of vocab_size rows: the padding rows are zero again."""
    for name in _PADDED:
        tensor = state.get(prefix + name)
        if tensor is not None and tensor.size(0) == model.config.vocab_size:
            padding = tensor.new_zeros(model.padded_vocab_size - tensor.size(0), *tensor.shape[1:])
            state[prefix + name] = torch.cat([tensor, padding])
