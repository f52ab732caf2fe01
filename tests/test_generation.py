"""Generation against references: full recomputation, argmax, transformers' generate(), one prompt at a time."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import poison_unwritten_cache_positions, tiny_config
from gpt2scratch.dataset.tokenizer import Tokenizer
from gpt2scratch.generation import (
    TextStream,
    complete,
    decoding_layout,
    generate_ids,
    sample_next,
    sample_rows,
    static_decoding_step,
    stream_tokens,
)
from gpt2scratch.hf import hf_model_from_gpt
from gpt2scratch.models import GPT


def model_and_prompts(context_length=32, vocab_size=101):
    model = GPT(tiny_config(context_length=context_length, vocab_size=vocab_size)).eval()
    prompts = [[5, 17, 3, 99, 42, 8, 1], [64, 2], [7, 7, 7, 7, 7, 7, 7, 7, 7, 13, 21], [50]]
    return model, prompts


def test_cached_logits_equal_full_recomputation_at_every_step():
    """Failure means the KV cache (or the positions it implies) diverges from what the model computes."""
    model, prompts = model_and_prompts()
    history = torch.tensor([prompts[0]])
    caches = model.new_kv_caches()
    with torch.no_grad():
        logits, _ = model(history, caches=caches)
        for _ in range(20):
            full, _ = model(history)
            assert_close(logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            history = torch.cat([history, next_id], dim=1)
            logits, _ = model(next_id, caches=caches)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int8-dynamic"])
def test_static_decoding_step_equals_the_model(dtype, monkeypatch):
    """The fixed-shape step that CUDA graphs replay (full-length masked attention, keys written at a tensor
    position) gives the model's own cached step's logits, for a left-padded batch, step after step (the caches'
    unwritten positions NaN until clear_unused)."""
    from gpt2scratch.generation import left_pad
    from gpt2scratch.quantization import apply_dtype

    poison_unwritten_cache_positions(monkeypatch)
    # The two attention paths may round differently in fp32's last bit (seen on an AVX2-only CPU: 1.2e-7), and
    # int8-dynamic quantizes each activation row to 256 levels: an activation on a level's boundary then moves
    # one level (5.7e-5 in the logits there). A key written at the wrong position moves them by ~0.5.
    atol = 1e-3 if dtype == "int8-dynamic" else 1e-5

    model, prompts = model_and_prompts()
    apply_dtype(model, dtype)
    history, pad = left_pad(prompts, 32, "cpu")
    eager, static = model.new_kv_caches(), model.new_kv_caches()
    with torch.no_grad():
        logits, _ = model(history, caches=eager, pad_lengths=pad, last_only=True)
        model(history, caches=static, pad_lengths=pad, last_only=True)
        for cache in static:
            cache.clear_unused()
        for _ in range(32 - history.size(1)):  # up to the last position of the cache
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            logits, _ = model(next_id, caches=eager, pad_lengths=pad, last_only=True)
            position = torch.tensor(static[0].length)
            ours = static_decoding_step(model, next_id, static, position, pad)
            for cache in static:
                cache.length += 1
            assert_close(ours, logits, rtol=1e-5, atol=atol)
        for a, b in zip(eager, static, strict=True):  # the same keys and values, in the same slots
            assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
            assert_close(a.v, b.v, rtol=1e-5, atol=1e-5)


def test_cuda_graph_decoding_bookkeeping_with_a_stand_in_graph(monkeypatch):
    """CUDAGraphDecoding's side of it, on a CPU: a stand-in for torch.cuda's graph whose replay runs the captured
    step again on the same buffers. Greedy tokens equal plain decoding's, in a padded batch and alone, past the
    context (each crop: new caches, a new capture). On a GPU, tests/test_speed_features.py checks the real one."""
    import contextlib
    import types

    from gpt2scratch.generation import CUDAGraphDecoding, use_cuda_graphs

    model, prompts = model_and_prompts()
    reference = [generate_ids(model, batch, 60, temperature=0) for batch in (prompts, prompts[:1])]
    poison_unwritten_cache_positions(monkeypatch)  # eager decoding never reads them; the static step clears them
    eager = [generate_ids(model, batch, 60, temperature=0) for batch in (prompts, prompts[:1])]
    assert eager == reference
    decoder = use_cuda_graphs(model).compiled_decoding

    class StandInGraph:
        def replay(self):
            step = static_decoding_step(decoder.model, decoder.idx, decoder.caches, decoder.position, decoder.pad)
            decoder.logits.copy_(step)

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: stream)
    monkeypatch.setattr(CUDAGraphDecoding, "device_type", "cpu")
    graphed = [generate_ids(model, batch, 60, temperature=0) for batch in (prompts, prompts[:1])]
    assert graphed == eager
    # 60 new tokens in a 32-token context, a crop to 16 tokens each time the cache is full: the batch (longest
    # prompt 11) crops after tokens 22, 39 and 56, the first prompt alone after 26, 43 and 60 (that last one
    # followed by no step); each generation and each crop followed by a step captures once
    assert decoder.captures == (1 + 3) + (1 + 2)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    model, prompts = model_and_prompts()
    greedy = generate_ids(model, [prompts[0]], 15, temperature=0)[0]
    generator = torch.Generator().manual_seed(0)
    top1 = generate_ids(model, [prompts[0]], 15, temperature=1.3, top_k=1, generator=generator)[0]
    assert greedy == top1
    history = list(prompts[0])
    with torch.no_grad():
        for token in greedy:
            assert token == model(torch.tensor([history]))[0][0, -1].argmax().item()
            history.append(token)


@pytest.mark.parametrize("sampling", [{"temperature": 1e-40}, {"temperature": 1e-50}, {"top_p": 0.0}])
def test_top_p_0_and_tiny_temperatures_are_greedy(sampling):
    """No NaN from dividing by a temperature float32 cannot hold, and top_p 0 keeps the likeliest token: greedy."""
    model, prompts = model_and_prompts()
    greedy = generate_ids(model, prompts, 15, temperature=0)
    generator = torch.Generator().manual_seed(0)
    assert generate_ids(model, prompts, 15, **{"temperature": 1.0, **sampling}, generator=generator) == greedy
    logits = torch.randn(4, 101) * 5
    uniform = torch.rand(4)
    temperature = torch.full((4,), sampling.get("temperature", 1.0))
    top_p = torch.full((4,), sampling.get("top_p", 1.0))
    assert torch.equal(
        sample_rows(logits, temperature, torch.zeros(4, dtype=torch.long), top_p, uniform), logits.argmax(-1)
    )


def test_greedy_ids_equal_transformers_generate():
    """Our greedy tokens equal transformers' greedy generate() on the same (random, tiny) weights."""
    model, prompts = model_and_prompts()
    hf = hf_model_from_gpt(model)
    for prompt in prompts:
        theirs = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
        assert generate_ids(model, [prompt], 20, temperature=0) == [theirs]


def test_batched_generation_equals_one_by_one():
    """Prompts of different lengths, left-padded in one batch, generate what each generates alone."""
    model, prompts = model_and_prompts()
    batched = generate_ids(model, prompts, 12, temperature=0)
    assert batched == [generate_ids(model, [p], 12, temperature=0)[0] for p in prompts]
    # and a padded row sees the same logits as the prompt alone, not only the same argmax
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    pad = torch.tensor([T - len(p) for p in prompts])
    with torch.no_grad():
        padded, _ = model(idx, pad_lengths=pad)
        for row, prompt in enumerate(prompts):
            alone, _ = model(torch.tensor([prompt]))
            assert_close(padded[row, T - len(prompt) :], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.cat(list(stream_tokens(model, prompts, 1, temperature=0)), 1)[:, 0].tolist() == [r[0] for r in batched]


def test_sampling_is_reproducible_with_a_seed():
    model, prompts = model_and_prompts()
    sample = lambda seed: generate_ids(model, prompts, 10, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_top_p_keeps_at_least_one_token_and_filters_the_tail():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    for _ in range(20):
        assert sample_next(logits, top_p=1e-9).item() == 0  # only the most likely survives
    allowed = {sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    # softmax: [0.61, 0.22, 0.14, 0.02, 0.003]: 0.61 < 0.8 so token 1 stays; 0.83 >= 0.8 so token 2 goes
    assert allowed == {0, 1}
    allowed = {sample_next(logits, top_k=3, generator=torch.Generator().manual_seed(s)).item() for s in range(300)}
    assert allowed == {0, 1, 2}


def test_a_prompt_longer_than_the_context_follows_the_crop_rule():
    """Prompt cropped to its last context_length tokens; when the context fills, keep the last half and recompute."""
    model, _ = model_and_prompts(context_length=16)
    prompt = [(7 * i) % 101 for i in range(40)]
    ours = generate_ids(model, [prompt], 40, temperature=0)[0]
    history, start = prompt[-16:], 0  # the stated rule, written out without a cache
    expected = []
    with torch.no_grad():
        for _ in range(40):
            token = model(torch.tensor([history[start:]]))[0][0, -1].argmax().item()
            expected.append(token)
            history.append(token)
            if len(history) - 1 - start >= 16:
                start = len(history) - 8
    assert ours == expected
    assert len(ours) == 40  # no error from inside torch, however long the text gets


def test_text_stream_is_utf8_safe_and_stops_at_stop_strings():
    tokenizer = Tokenizer.gpt2()
    ids = tokenizer.encode("party 🎉 time. THE END and more")
    stream = TextStream(tokenizer, stop=["THE END"])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "party 🎉 time. "
    assert all("\ufffd" not in piece for piece in pieces)
    assert stream.stopped


def test_complete_stops_at_end_of_text_and_stop_strings():
    model, _ = model_and_prompts(vocab_size=50257)
    tokenizer = Tokenizer.gpt2()
    free = complete(model, tokenizer, ["Hello", "A longer prompt here"], 25, temperature=0)
    assert len(free) == 2 and all(isinstance(text, str) for text in free)
    for row, text in enumerate(free):
        if len(text) > 3:
            stop = text[2:4]
            cut = complete(model, tokenizer, [["Hello", "A longer prompt here"][row]], 25, temperature=0, stop=[stop])
            assert cut[0] == text[: text.find(stop)]


def test_seeded_rows_draw_as_if_alone():
    """With a seed, row i draws from its own generator, seeded seed + i (as the server seeds a request's choices):
    its text is the one it gets alone with that seed, whatever shares its batch (here the packed weights of
    batched steps, and a padded row); the same prompt twice gets two samples."""
    model, _ = model_and_prompts(vocab_size=50257)
    decoding_layout(model)
    tokenizer = Tokenizer.gpt2()
    prompts = ["Hello", "A longer prompt here", "Hello"]
    sampling = dict(temperature=1.0, top_k=50)
    batch = complete(model, tokenizer, prompts, 20, seed=5, **sampling)
    for row, prompt in enumerate(prompts):
        assert batch[row] == complete(model, tokenizer, [prompt], 20, seed=5 + row, **sampling)[0]
    assert batch[0] != batch[2]
    assert complete(model, tokenizer, prompts, 20, seed=5, **sampling) == batch
    greedy = complete(model, tokenizer, prompts, 20, seed=5, temperature=0)
    assert greedy == complete(model, tokenizer, prompts, 20, temperature=0) and greedy[0] == greedy[2]


def test_empty_prompt_is_an_error():
    model, _ = model_and_prompts()
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate_ids(model, [[]], 5)


@pytest.mark.parametrize("weight_tying", [True, False])
def test_decoding_layout_keeps_values_and_generation(weight_tying):
    """The in-major weight layout changes memory order only: same parameters, same logits, same greedy tokens."""
    torch.manual_seed(0)
    model = GPT(tiny_config(weight_tying=weight_tying)).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompts = torch.randint(0, 101, (3, 7))
    logits = model(prompts)[0]
    greedy = generate_ids(model, prompts.tolist(), 20, temperature=0)
    decoding_layout(model)
    assert not model.lm_head.weight.is_contiguous() and model.lm_head.weight.t().is_contiguous()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert (model.lm_head.weight is model.transformer.wte.weight) == weight_tying
    assert_close(model(prompts)[0], logits, rtol=1e-5, atol=1e-5)
    assert generate_ids(model, prompts.tolist(), 20, temperature=0) == greedy


def test_decoding_linear_packs_batched_steps_only():
    """A batch's one-token step goes through the oneDNN-packed weight (to fp32 rounding of F.linear); one row,
    several positions and a gradient take F.linear bit for bit. Failure in the first part means the packed product
    is wrong; in the second, that batch 1 or prompts no longer compute what they did."""
    from gpt2scratch.models.linear import DecodingLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 200)
    module = DecodingLinear.from_linear(linear)
    assert module.weight is linear.weight and module.bias is linear.bias
    with torch.inference_mode():
        x = torch.randn(5, 1, 48)
        assert_close(module(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        if torch.backends.mkldnn.is_available():
            assert module._packed[1] is not None, "the batched step did not take the packed weight"
        for shape in [(1, 1, 48), (5, 3, 48), (1, 7, 48)]:
            x = torch.randn(shape)
            assert torch.equal(module(x), F.linear(x, linear.weight, linear.bias)), shape
    x = torch.randn(5, 1, 48)
    assert torch.equal(module(x), F.linear(x, linear.weight, linear.bias))  # with a gradient: F.linear
    assert module(x).requires_grad


def test_decoding_linear_repacks_when_the_weight_changes():
    """Failure means a batched step multiplies by a stale copy of weights that have changed since (a model
    sampled from during training, say)."""
    from gpt2scratch.models.linear import DecodingLinear

    torch.manual_seed(0)
    module = DecodingLinear.from_linear(torch.nn.Linear(32, 64, bias=False))
    x = torch.randn(4, 1, 32)
    with torch.no_grad():
        module(x)
        module.weight.mul_(-2.0)  # in place: same storage, a new version
        assert_close(module(x), F.linear(x, module.weight), rtol=1e-5, atol=1e-5)
        module.weight.data = torch.randn(64, 32)  # new storage
        assert_close(module(x), F.linear(x, module.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_tying", [True, False])
def test_batched_decoding_after_the_layout_equals_recomputation(weight_tying):
    """Batched decoding through the packed weights (decoding_layout): each row's greedy tokens are those of full
    recomputation (logits to fp32 rounding), and the packed copies were used. Failure means the layout's batched
    path computes something else than the model."""
    from gpt2scratch.models.linear import DecodingLinear

    torch.manual_seed(0)
    model = GPT(tiny_config(weight_tying=weight_tying)).eval()
    prompts = [[5, 17, 3, 99, 42, 8, 1], [64, 2], [7, 7, 7, 7, 7, 7, 7, 7, 7, 13, 21]]
    decoding_layout(model)
    head = model.lm_head
    decoding_layout(model)  # again: nothing more
    assert type(head) is DecodingLinear and model.lm_head is head
    assert (model.lm_head.weight is model.transformer.wte.weight) == weight_tying
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    generated = generate_ids(model, prompts, 12, temperature=0)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, generated, strict=True):
            history = list(prompt)
            for token in tokens:
                logits = model(torch.tensor([history]))[0][0, -1]
                assert token == int(logits.argmax()), (prompt, tokens)
                history.append(token)
    if torch.backends.mkldnn.is_available():
        assert model.lm_head._packed[1] is not None, "batched steps did not use the packed weights"


@pytest.mark.slow
def test_warmed_up_decoding_compiles_nothing_more():
    """After warm_up_decoding (what `serve --compile` runs before it listens), prompts and steps of other batch
    sizes and lengths run the graphs it compiled. Failure means a request would wait for a compilation: e.g. the
    warm-up's batch of 2 given the symbol of the 2 heads (dynamo's duck shaping), and so fixed at 2."""
    from gpt2scratch.generation import compile_decoding, decoding_step, warm_up_decoding

    torch.manual_seed(0)
    model = decoding_layout(GPT(tiny_config(context_length=64, n_heads=2, n_layers=1)).eval())  # `tiny`'s 2 heads
    compiled = decoding_step(compile_decoding(model))
    warm_up_decoding(model)
    with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
        for rows, length in [(3, 2), (2, 2), (4, 4), (5, 9), (1, 6), (16, 3)]:
            caches = model.new_kv_caches()
            compiled(torch.randint(0, 101, (rows, length)), caches=caches, last_only=True)
            for _ in range(3):
                compiled(torch.randint(0, 101, (rows, 1)), caches=caches, last_only=True)
    assert not compiled.failed, "a prompt or step compiled again (and fell back to eager)"


@pytest.mark.parametrize("padded", [False, True])
def test_one_query_attention_equals_sdpa(padded):
    """The attention a compiled decoding step runs for its one new query, against SDPA with the causal mask."""
    from gpt2scratch.models.multi_head_self_attention import causal_mask, one_query_attention

    torch.manual_seed(0)
    B, nh, L, hs = 3, 4, 9, 16
    q, k, v = torch.randn(B, nh, 1, hs), torch.randn(B, nh, L, hs), torch.randn(B, nh, L, hs)
    pad = torch.tensor([0, 3, 8]) if padded else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(1, L - 1, q.device, pad))
    assert_close(one_query_attention(q, k, v, pad), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_steps_skip_guards_only_where_a_graph_took_them():
    """A compiled one-token step of a kind already run with its guards checked skips checking them; where that
    would need a graph not compiled yet (here: the signature is made to lie, so batch 1 and batch 2 look alike),
    dynamo refuses and the step runs again with every guard: the tokens are the eager model's."""
    from gpt2scratch.generation import compile_decoding

    model, prompts = model_and_prompts()
    eager = [generate_ids(model, [p], 6, temperature=0) for p in prompts[:2]]
    eager_batch = generate_ids(model, prompts[:2], 6, temperature=0)
    compiled = compile_decoding(GPT(model.config).eval())
    compiled.load_state_dict(model.state_dict())
    compiled.compiled_decoding.inductor = {}  # inductor's defaults: the quickest compile, same graph logic
    assert generate_ids(compiled, [prompts[0]], 6, temperature=0) == eager[0]
    warm = set(compiled.compiled_decoding.warm)
    assert len(warm) == 1  # one kind of step (batch 1, no padding), run with guards once, then without
    assert generate_ids(compiled, [prompts[1]], 6, temperature=0) == eager[1]
    assert compiled.compiled_decoding.warm == warm
    compiled.compiled_decoding.one_token_step = lambda *args: "one kind"  # every step now looks warm ...
    compiled.compiled_decoding.warm = {"one kind"}
    assert generate_ids(compiled, prompts[:2], 6, temperature=0) == eager_batch  # ... a batch needs its own graph
    assert not compiled.compiled_decoding.failed
