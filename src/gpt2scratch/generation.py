"""Text generation with a key/value cache: the prompt is processed once, then one token per forward pass.

Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k, then top-p (nucleus), then a draw
from a `torch.Generator` (so sampling never disturbs the global RNG that dropout uses in training).

Context rule: when prompt + new tokens would exceed the model's context, the oldest tokens are cropped: the
model keeps the last `context_length // 2` tokens, recomputes the cache from them, and goes on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gpt2scratch.models.gpt import GPT


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). top_k=0 and top_p=1 switch those filters off."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def stream_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B, 1) new token ids one at a time for prompts idx (B, T) of equal length.

    Rows that produced eot_id keep yielding eot_id; the iteration stops when every row has, or after
    max_new_tokens.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("the prompt must be a (batch, time) tensor with at least one token")
    was_training = model.training
    model.eval()
    context = model.config.context_length
    history = idx
    caches = model.new_kv_caches()
    logits, _ = model(history[:, -context:], caches=caches)
    finished = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eot_id is not None:
                next_id = next_id.masked_fill(finished, eot_id)
                finished |= next_id == eot_id
            yield next_id
            if eot_id is not None and bool(finished.all()):
                return
            history = torch.cat([history, next_id], dim=1)
            if caches[0].length >= context:  # full: crop to the last half of the context, recompute the cache
                caches = model.new_kv_caches()
                logits, _ = model(history[:, -(context // 2) :], caches=caches)
            else:
                logits, _ = model(next_id, caches=caches)
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """Prompt idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (see stream_tokens for options)."""
    new = list(stream_tokens(model, idx, max_new_tokens, **sampling))
    return torch.cat([idx, *new], dim=1)
