"""Text generation with a key/value cache: each prompt is processed once, then one token per forward pass.

Sampling: temperature 0 (or one too small for float32) and top_p 0 are greedy; otherwise logits / temperature,
then top-k, then top-p (nucleus), then a draw from a `torch.Generator` (so sampling never touches the global RNG
that dropout uses in training).

Batches: prompts of different lengths are left-padded; the padding is masked out of attention and each row's
positions start at 0 after its padding, so a row generates what it would generate alone.

Context rule: a prompt longer than the model's context keeps its last `context_length` tokens. When prompt +
new tokens reach the context, the oldest tokens are cropped: the model keeps the last `context_length // 2`
tokens, recomputes the cache from them, and goes on (a recomputation every context_length // 2 tokens).

Stopping: at <|endoftext|> (a row that has stopped yields no more text), at any of the stop strings, or after
max_new_tokens.
"""

from __future__ import annotations

import codecs
import sys
import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as fx_config

from gpt2scratch.config import Sampling
from gpt2scratch.models.gpt import GPT
from gpt2scratch.models.linear import DecodingLinear, Linear
from gpt2scratch.runtime import cpu_has_amx_bf16, cpu_has_native_bf16

TINY_TEMPERATURE = torch.finfo(torch.float32).tiny  # below this, sampling is greedy (see is_greedy)


def decoding_layout(model: GPT) -> GPT:
    """Ready an fp32 model for decoding on a CPU, in place (for generation only; the same parameters and values):
    - each Linear weight stored in-major, the (in, out) matrix contiguous, as GPT-2's Conv1D checkpoints keep it:
      the matrix-vector products of batch-1 decoding read that layout faster (GPT-2 124M decodes about 1.35x
      faster at batch 1 on this project's machine). A state_dict taken afterwards holds non-contiguous tensors;
    - each Linear a DecodingLinear: one-token steps of several rows multiply by a oneDNN-packed copy of the weight
      (made at the first such step), which that layout would slow down instead (about 1.6x faster a step of 16
      rows for GPT-2 124M; batch 1 and prompts are unchanged, bit for bit).
    Does nothing on other devices and dtypes, and nothing more when called again."""
    if model.lm_head.weight.device.type != "cpu" or model.lm_head.weight.dtype != torch.float32:
        return model  # (bf16 and int8 models read their row-major weights faster: quantization.py)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (torch.nn.Linear, Linear):  # (a DecodingLinear already: laid out)
                child.weight.data = child.weight.data.t().contiguous().t()
                setattr(module, name, DecodingLinear.from_linear(child))
    return model


# Inductor settings for the decoding step on a CPU: the weights become constants (freezing), so that its C++
# GEMM template can pack them once and read them at close to memory bandwidth; that template (AMX / AVX-512 micro
# kernels, int8 weight-only included) is only used under max_autotune, and with "CPP" alone no alternative is
# timed at compile time. About 2x faster than eager for a bf16 or int8 GPT-2 124M step at batch 1 on this
# project's machines (python bench/generate_speed.py). Inductor's FX graph cache is off: it would hand a second
# model of the same shapes (in this process or a later one) the compiled graph of the first, in which the first's
# weights are frozen.
CPU_DECODING_INDUCTOR = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "fx_graph_cache": False,
}


# Dynamo gives the sizes of equal value one symbol (duck shaping): a cache (B, nh, max_len, hs) first seen at batch
# 2 of a model with 2 heads tied the batch to the heads, which are fixed, and the next batch size compiled again
# while requests waited (18-38 s for the 2-head `tiny` preset here; longer for larger models). Each size its own
# symbol.
NO_DUCK_SHAPES = {"use_duck_shape": False}


class CompiledDecoding:
    """A model's decoding forward pass, `model(idx, caches=..., pad_lengths=..., last_only=...)` (the prompt, then
    one token at a time), compiled with torch.compile (inductor) on first use, with dynamic shapes so that one graph
    serves every prompt or cache length and batch size (a prompt and a single token, batch 1 and padded batches are
    graphs of their own). Where compiling fails (no C++ compiler, an unsupported device), it says so on stderr once and
    decodes eagerly."""

    def __init__(self, model: GPT):
        self.model = model
        # Dynamo keeps compiled graphs per code object, at most torch._dynamo.config.recompile_limit of them (then
        # it runs eagerly): a copy of _decode's code for each model gives each model its own.
        own = types.FunctionType(_decode.__code__.replace(co_name=f"decode_{id(model):x}"), _decode.__globals__)
        self.compiled = torch.compile(own, dynamic=True)
        on_cpu = model.lm_head.weight.device.type == "cpu"
        self.inductor = CPU_DECODING_INDUCTOR if on_cpu else {}
        dtype = getattr(model, "decode_dtype", None)
        if on_cpu and dtype == "int8-dynamic":
            # the C++ GEMM template has no int8 x int8 product (torch._int_mm), and without it there are no
            # choices to tune: ATen's product, and the quantization around it fused into C++ kernels
            self.inductor = {**self.inductor, "max_autotune": False}
        # On a CPU with avx512_bf16 but no AMX the C++ GEMM template's micro-kernels are slower than what inductor
        # takes without max_autotune for several rows (bf16: oneDNN's product on the weight packed at freezing;
        # int8: ATen's weight-only kernel), faster for one. GPT-2 124M on a 2-core AMD EPYC, tok/s: bf16 batch 8
        # 155 tuned, 310-390 not, batch 4 171 / 216, batch 2 148 / 119 (batches of 2 and more share a graph),
        # batch 1 91 / 65; int8 batch 8 206 / 242. So there the graphs whose products take several rows (prompts,
        # batches) are not tuned.
        self.rows_untuned = on_cpu and dtype in ("bf16", "int8") and cpu_has_native_bf16() and not cpu_has_amx_bf16()
        self.failed = False
        self.warm: set[tuple] = set()  # the one-token steps that have run with their guards checked

    def __call__(self, idx: torch.Tensor, caches, pad_lengths: torch.Tensor | None = None, last_only: bool = False):
        if caches[0].length == 0:
            self.model.check_input(idx)  # what the eager forward checks of a prompt (compiled code skips it)
        if pad_lengths is None and idx.size(0) > 1:  # one graph for batches padded or not (zeros: no padding)
            pad_lengths = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
        if not self.failed:
            from torch._dynamo.exc import TorchDynamoException  # what compiling raises (the model's errors pass)

            step = self.one_token_step(idx, caches, pad_lengths, last_only)
            try:
                inductor = self.inductor
                if self.rows_untuned and idx.numel() > 1:
                    inductor = {**inductor, "max_autotune": False}
                with torch._inductor.config.patch(inductor), fx_config.patch(NO_DUCK_SHAPES):
                    return self._run(idx, caches, pad_lengths, last_only, step)
            except TorchDynamoException as error:
                self.failed = True
                reason = (str(error).strip() or type(error).__name__).splitlines()[0][:300]
                print(
                    f"warning: --compile: compiling the decoding step failed ({reason}); decoding without it",
                    file=sys.stderr,
                )
        return self.model(idx, caches=caches, pad_lengths=pad_lengths, last_only=last_only)

    def _run(self, idx: torch.Tensor, caches, pad_lengths: torch.Tensor | None, last_only: bool, step: tuple | None):
        """Dynamo checks ~1,000 guards before each call (on the modules, and on each layer's cache shapes): a few
        tenths of a millisecond of a 7 ms int8 step. A one-token step of a kind that has already run with its
        guards checked (and compiled if need be) runs the graph that took it without checking them all again
        (only those that tell its graphs apart). Should that find no graph for it (dynamo then raises rather than
        recompile), the step runs again with every guard checked."""
        if step in self.warm:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self.compiled(self.model, idx, caches, pad_lengths, last_only)
            except RuntimeError as error:
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self.warm.discard(step)
        out = self.compiled(self.model, idx, caches, pad_lengths, last_only)
        if step is not None:
            self.warm.add(step)
        return out

    @staticmethod
    def one_token_step(idx: torch.Tensor, caches, pad_lengths: torch.Tensor | None, last_only: bool) -> tuple | None:
        """What decides which compiled graph runs a one-token step (None for a prompt): one row or several
        (batch sizes from 2 up share a graph), the ids' layout, dtype and device, padding or none, last_only, the grad,
        inference and autocast modes, the caches' number and dtype, and a cache of at least 2 positions (dynamo
        gives the lengths 0 and 1 graphs of their own). Within the context, the cache's length and the batch size
        change nothing else: the graph takes them as symbols."""
        k = caches[0].k
        if idx.size(1) != 1 or caches[0].length < 2 or k is None:
            return None
        return (
            idx.size(0) == 1,
            idx.stride(),
            idx.storage_offset(),
            idx.dtype,
            idx.device,
            None if pad_lengths is None else (pad_lengths.stride(), pad_lengths.dtype),
            last_only,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled(idx.device.type),
            len(caches),
            k.dtype,
            k.stride()[1:],
        )


def _decode(model: GPT, idx: torch.Tensor, caches, pad_lengths: torch.Tensor | None, last_only: bool):
    return model(idx, caches=caches, pad_lengths=pad_lengths, last_only=last_only)


def static_decoding_step(
    model: GPT, idx: torch.Tensor, caches, position: torch.Tensor, pad_lengths: torch.Tensor
) -> torch.Tensor:
    """One one-token decoding step whose tensors have the same shapes and addresses at every step, as a CUDA graph
    needs: idx (B, 1) at cache position `position` (a 0-d long tensor: the caches' length before this token),
    pad_lengths (B,) (zeros for no padding). The new keys and values go into the caches' preallocated buffers at
    `position` (their `length` is left to the caller), and attention reads all max_len positions under a mask
    (those after `position` and a row's left padding hidden): zero the unused ones first (KVCache.clear_unused).
    Returns the last position's logits (B, 1, vocab_size). The blocks' arithmetic is the model's (TransformerBlock,
    MultiHeadSelfAttention; tested equal to it)."""
    B, C = idx.size(0), model.config.emb_dim
    max_len = caches[0].k.size(2)
    pos = (position - pad_lengths).clamp(min=0)[:, None]  # (B, 1)
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)  # (B, 1, C) (dropout: eval)
    keys = torch.arange(max_len, device=idx.device)
    visible = (keys[None, :] >= pad_lengths[:, None]) & (keys[None, :] <= position)  # (B, max_len)
    mask = visible[:, None, None, :]  # (B, 1, 1, max_len)
    slot = position.view(1)
    for block, cache in zip(model.transformer.h, caches, strict=True):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, 1, attn.n_heads, C // attn.n_heads).transpose(1, 2) for t in (q, k, v))
        cache.k.index_copy_(2, slot, k.to(cache.k.dtype))
        cache.v.index_copy_(2, slot, v.to(cache.v.dtype))
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask)  # (B, nh, 1, hs)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    logits = model.lm_head(model.transformer.ln_f(x))
    return logits[..., : model.config.vocab_size]


class CUDAGraphDecoding:
    """A model's one-token decoding steps replayed from a CUDA graph (`static_decoding_step`, captured once per
    set of caches: a generation, or a crop of its context), so that a step costs one launch instead of a few
    hundred: on a GPU, eager decoding of GPT-2 124M is bound by launches (3.3 ms a token on an H200 while its
    weights take 0.13 ms to read). Prompts, and steps on other devices, run the model as it is. On an H200,
    GPT-2 124M, 128 new tokens at batch 1: 437 tok/s against 287 eager (bench/generate_speed.py, in
    bench/gpu_check.sh with `tests/test_speed_features.py::test_cuda_graph_decoding_follows_the_model`)."""

    device_type = "cuda"  # where steps are captured (a test's stand-in graph runs on a CPU)

    def __init__(self, model: GPT):
        self.model = model
        self.caches = None  # the caches the graph was captured for (kept, so that their buffers stay alive)
        self.captures = 0

    def __call__(self, idx: torch.Tensor, caches, pad_lengths: torch.Tensor | None = None, last_only: bool = False):
        one_step = idx.size(1) == 1 and caches[0].length > 0 and idx.device.type == self.device_type
        if not one_step or caches[0].length >= caches[0].max_len:
            return self.model(idx, caches=caches, pad_lengths=pad_lengths, last_only=last_only)
        if caches is not self.caches:  # (the same caches: the same batch)
            self._capture(idx, caches, pad_lengths)
        self.idx.copy_(idx)
        self.position.fill_(caches[0].length)
        self.graph.replay()
        for cache in caches:
            cache.length += 1
        return self.logits.clone(), None

    def _capture(self, idx: torch.Tensor, caches, pad_lengths: torch.Tensor | None) -> None:
        self.caches, self.idx = caches, idx.clone()
        self.position = torch.tensor(caches[0].length, device=idx.device)
        self.pad = torch.zeros(idx.size(0), dtype=torch.long, device=idx.device)
        if pad_lengths is not None:
            self.pad.copy_(pad_lengths)
        for cache in caches:  # (the step reads every position, masked or not)
            cache.clear_unused()
        # Warm-up runs on a side stream (as torch.cuda.graphs asks), writing this step's keys and values into the
        # caches at `position`: the replay writes the same ones there again.
        stream = torch.cuda.Stream(idx.device)
        stream.wait_stream(torch.cuda.current_stream(idx.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                static_decoding_step(self.model, self.idx, caches, self.position, self.pad)
        torch.cuda.current_stream(idx.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        self.captures += 1
        with torch.cuda.graph(self.graph):
            self.logits = static_decoding_step(self.model, self.idx, caches, self.position, self.pad)


def use_cuda_graphs(model: GPT) -> GPT:
    """Make the model's decoding steps (stream_tokens, generate_ids) replay CUDA graphs on a GPU
    (CUDAGraphDecoding); returns it. Not with compile_decoding (one or the other)."""
    model.compiled_decoding = CUDAGraphDecoding(model)
    return model


def compile_decoding(model: GPT) -> GPT:
    """Make the model's decoding steps (stream_tokens, the server) run compiled (CompiledDecoding); returns it.
    The first prompt and the first step compile (a minute or two for GPT-2 124M on 2 cores, in each process)."""
    model.compiled_decoding = CompiledDecoding(model)
    return model


def decoding_step(model: GPT):
    """What runs one decoding step of `model`: its compiled step (compile_decoding) or the model itself."""
    return getattr(model, "compiled_decoding", None) or model


def warm_up_decoding(model: GPT) -> None:
    """Compile the passes a server runs (a prompt of two tokens or more, then one-token steps; for one row and for
    several) before it takes requests, not during the first ones."""
    step = decoding_step(model)
    eot = model.config.vocab_size - 1
    device = model.lm_head.weight.device
    with torch.inference_mode():  # as the server's engine runs (under no_grad, its tensors would need other graphs)
        for rows in (1, 2):
            caches = model.new_kv_caches()
            step(torch.full((rows, 2), eot, device=device), caches=caches, last_only=True)
            for _ in range(2):  # a second length: the cache's length is dynamic from the start
                step(torch.full((rows, 1), eot, device=device), caches=caches, last_only=True)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). top_k=0 and top_p=1 switch those filters off; temperature 0 (or
    one too small for float32) and top_p 0 are greedy."""
    if is_greedy(temperature, top_p):
        return logits.argmax(dim=-1, keepdim=True)
    logits = _scale(logits, temperature)
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


def is_greedy(temperature, top_p):
    """Which settings mean "the likeliest token": temperature 0 or below float32's smallest normal number (dividing
    by it would overflow), or top_p 0 (no probability mass at all). Works on floats and on (B,) tensors."""
    return (temperature < TINY_TEMPERATURE) | (top_p <= 0)


def _scale(logits: torch.Tensor, temperature) -> torch.Tensor:
    """logits / temperature in float32, shifted so that the largest is 0: a tiny temperature then sends the
    others to -inf (a one-hot distribution), never to inf - inf = NaN."""
    logits = logits.float()
    return (logits - logits.max(dim=-1, keepdim=True).values) / temperature


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), each row with its own settings, as a server batching different
    requests needs: temperature (B,) (0 = greedy), top_k (B,) (0 = off; exactly k tokens stay), top_p (B,), and
    uniform (B,) draws in [0, 1), one per row from that row's own generator, so a row's tokens do not depend on the
    rows beside it. Filters as in sample_next; the draw is the inverse of the kept tokens' cumulative distribution."""
    greedy_rows = is_greedy(temperature, top_p)
    greedy = rows = None
    if bool(greedy_rows.any()):
        greedy = logits.argmax(dim=-1)
        rows = (~greedy_rows).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return greedy
        logits, temperature, top_k, top_p, uniform = (t[rows] for t in (logits, temperature, top_k, top_p, uniform))
    V = logits.size(-1)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    if bool((k < V).all()):  # every row keeps at most max(k) tokens: a partial sort, then only those are scaled
        sorted_logits, order = torch.topk(logits, int(k.max()), dim=-1)  # (the order / temperature keeps)
        sorted_logits = _scale(sorted_logits, temperature[:, None])
    elif not bool((k < V).any() or (top_p < 1).any()):  # no filter at all: no sort needed
        sorted_logits, order = _scale(logits, temperature[:, None]), None
    else:
        sorted_logits, order = torch.sort(_scale(logits, temperature[:, None]), descending=True, dim=-1)
    ranks = torch.arange(sorted_logits.size(-1), device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    if order is not None:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)  # the first always stays
    cdf = probs.cumsum(dim=-1)
    target = (uniform.to(cdf) * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.size(-1) - 1)  # skips probability-0 tokens
    token = (choice if order is None else order.gather(-1, choice)).squeeze(-1)
    return token if rows is None else greedy.index_copy(0, rows, token)


def row_generator(seed: int, row: int) -> torch.Generator:
    """The CPU generator of batch row `row` under `seed` (a request's choice, a --num-samples sample): seed + row."""
    return torch.Generator().manual_seed((seed + row) % 2**63)


def row_uniforms(generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """One draw in [0, 1) from each row's own generator: sample_rows' `uniform`, (B,) on `device`."""
    return torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)


def left_pad(prompts: Sequence[Sequence[int]], context: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids, each prompt cropped to its last `context` tokens and left-padded to the longest, and the
    (B,) pad lengths (None when no row is padded)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty text can start from <|endoftext|>)")
    prompts = [list(p)[-context:] for p in prompts]
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)
    return idx, (pad if bool(pad.any()) else None)


@torch.no_grad()
def stream_tokens(
    model: GPT,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = Sampling.temperature,
    top_k: int = Sampling.top_k,
    top_p: float = Sampling.top_p,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B, 1) new token ids, one step at a time, for B prompts (lists of ids, or a (B, T) tensor).

    A row that produced eot_id keeps yielding eot_id; iteration ends when every row has, or after max_new_tokens.
    Random draws come from `generator` (or torch's global one), or with row_generators (CPU generators, one per
    row) each row's from its own, as the server draws them (sample_rows): a row's tokens then do not depend on the
    rows beside it.
    """
    device = model.lm_head.weight.device
    context = model.config.context_length
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    history, pad = left_pad(prompts, context, device)
    if row_generators is not None:
        if len(row_generators) != history.size(0):
            raise ValueError(f"{len(row_generators)} row generators for {history.size(0)} prompts")
        settings = [torch.full((history.size(0),), value, device=device) for value in (temperature, top_k, top_p)]
    was_training = model.training
    model.eval()
    caches = model.new_kv_caches()
    step = decoding_step(model)
    logits, _ = step(history, caches=caches, pad_lengths=pad, last_only=True)
    finished = torch.zeros(history.size(0), 1, dtype=torch.bool, device=device)
    try:
        for _ in range(max_new_tokens):
            if row_generators is None:
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            else:
                next_id = sample_rows(logits[:, -1, :], *settings, row_uniforms(row_generators, device))[:, None]
            if eot_id is not None:
                next_id = next_id.masked_fill(finished, eot_id)
                finished |= next_id == eot_id
            yield next_id
            if eot_id is not None and bool(finished.all()):
                return
            history = torch.cat([history, next_id], dim=1)
            if caches[0].length >= context:  # full: crop to the last half of the context, recompute the cache
                keep = context // 2
                if pad is not None:
                    pad = (pad - (history.size(1) - keep)).clamp(min=0)
                    pad = pad if bool(pad.any()) else None
                history = history[:, -keep:]
                caches = model.new_kv_caches()
                logits, _ = step(history, caches=caches, pad_lengths=pad, last_only=True)
            else:
                logits, _ = step(next_id, caches=caches, pad_lengths=pad, last_only=True)
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """Prompts idx (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (options: see stream_tokens)."""
    new = list(stream_tokens(model, idx, max_new_tokens, **sampling))
    return torch.cat([idx.to(model.lm_head.weight.device), *new], dim=1)


def generate_ids(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
    """New token ids for each prompt (different lengths allowed), without the prompt and without <|endoftext|>."""
    steps = list(stream_tokens(model, prompts, max_new_tokens, **sampling))
    if not steps:
        return [[] for _ in prompts]
    rows = torch.cat(steps, dim=1).tolist()
    eot = sampling.get("eot_id")
    return [row[: row.index(eot)] if eot is not None and eot in row else row for row in rows]


class TextStream:
    """Turns one row's new token ids into text as it is produced: UTF-8 safe (a character split across tokens
    appears when complete), and cut at the first stop string (text that may begin one is held back)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet released
        self.text = ""  # released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Feed one token; returns the text that can be shown now ("" if none)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
        elif final or not self.stop:
            out, self.pending = self.pending, ""
        else:
            hold = max(len(s) for s in self.stop) - 1
            out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        self.text += out
        return out


def stream_text(
    model: GPT,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **sampling,
) -> Iterator[tuple[int, str]]:
    """Yield (row, text) pieces of the completions of `prompts` as they are generated. With a seed, row i draws
    from its own generator seeded seed + i (as the server seeds a request's choices): its text is the same whatever
    the other rows are, so `generate --num-samples 3 --seed 5`'s second sample is `--seed 6`'s first."""
    generators = None
    if seed is not None:
        generators = [row_generator(seed, row) for row in range(len(prompts))]
    ids = [tokenizer.encode(prompt) if prompt else [tokenizer.eot_id] for prompt in prompts]
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    done = [False] * len(prompts)
    steps = stream_tokens(model, ids, max_new_tokens, eot_id=tokenizer.eot_id, row_generators=generators, **sampling)
    for step in steps:
        for row, token in enumerate(step[:, 0].tolist()):
            if done[row]:
                continue
            if token == tokenizer.eot_id:
                done[row] = True
                piece = streams[row].finish()
            else:
                piece = streams[row].push(token)
                done[row] = streams[row].stopped
            if piece:
                yield row, piece
        if all(done):
            return
    for row, text_stream in enumerate(streams):
        if piece := text_stream.finish():
            yield row, piece


def complete(model: GPT, tokenizer, prompts: Sequence[str], max_new_tokens: int, **options) -> list[str]:
    """The completion (without the prompt) of each prompt; options as in stream_text."""
    texts = [""] * len(prompts)
    for row, piece in stream_text(model, tokenizer, prompts, max_new_tokens, **options):
        texts[row] += piece
    return texts
