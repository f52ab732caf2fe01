"""`gpt2scratch serve`: OpenAI's completions protocol over HTTP, checked against references:

- continuous batching (rows joining and leaving a running batch) gives each request what it gets alone;
- per-row sampling draws from the distribution sample_next defines;
- the official `openai` client completes and streams; bad requests get a 4xx naming the field and the server
  goes on; the API key; 429 when the queue is full; a client that disconnects frees its slot;
- 32 concurrent clients lose no request; the load-test script runs;
- the web page streams a completion in headless Chromium (tests/test_serve_browser.py).

Every model is a random tiny one with GPT-2's tokenizer, built here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import poison_unwritten_cache_positions, write_model
from gpt2scratch import loading
from gpt2scratch.generation import complete, sample_rows
from gpt2scratch.models.kv_cache import KVCache
from gpt2scratch.serve import build_app
from gpt2scratch.serve.engine import Engine, Job
from gpt2scratch.serve.protocol import KNOWN, CompletionRequest
from gpt2scratch.testing import ServerProcess, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory) -> Path:
    """Context 64: requests fill the KV cache, so the engine must drop padding from its front."""
    return write_model(tmp_path_factory.mktemp("serve") / "ctx64", context_length=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("serve") / "tiny", context_length=1024, emb_dim=64)


@pytest.fixture(scope="module")
def client(model_dir):
    from fastapi.testclient import TestClient

    app = build_app(loading.load(str(model_dir)), name="tiny", max_batch_size=8)
    with TestClient(app) as test_client:  # runs the lifespan: the engine thread starts and stops with it
        yield test_client


def completion_request(prompt_ids, max_tokens, temperature=0.0, n=1, seed=None, stop=(), top_k=0, top_p=1.0):
    return CompletionRequest(
        prompts=[prompt_ids],
        prompt_texts=[""],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        n=n,
        stop=tuple(stop),
        seed=seed,
        stream=False,
        include_usage=False,
        echo=False,
        model="m",
    )


def run_engine(engine: Engine, requests: list[CompletionRequest]) -> list[dict[int, str]]:
    """Submit every request at once; collect each one's text per choice."""

    async def main():
        loop = asyncio.get_running_loop()

        async def one(request):
            job = Job(request, loop)
            engine.submit(job)
            texts, left = {}, request.n_choices
            while left:
                event = await job.events.get()
                assert event.finish_reason != "error", event.text
                texts[event.choice] = texts.get(event.choice, "") + event.text
                left -= event.finish_reason is not None
            return texts

        return await asyncio.gather(*(one(r) for r in requests))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


# ---- the engine ------------------------------------------------------------------------------------------------


def test_continuous_batching_equals_one_request_at_a_time(small_context_model, monkeypatch):
    """Rows of different prompt lengths join a running batch (max 3 rows) as others finish, and the cache fills
    the context: every greedy completion equals generating that prompt alone, stop strings included (and no step
    reads a cache position that was not written: those are NaN here)."""
    loaded = loading.load(str(small_context_model))
    tokenizer = loaded.tokenizer
    poison_unwritten_cache_positions(monkeypatch)
    calls = {"join": 0, "drop_front": 0, "keep_rows": 0}
    for name in calls:
        original = getattr(KVCache, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            result = _original(*args, **kwargs)
            calls["joined in place"] += _name == "join" and result is args[0]
            return result

        monkeypatch.setattr(KVCache, name, staticmethod(counted) if name == "join" else counted)
    calls["joined in place"] = 0

    texts = ["Hello", "The history of the world is long", "a b c d e f g h i j k l m n o p q r s t", "ROMEO:", "x"]
    lengths = [60, 20, 40, 30, 63]
    requests = [completion_request(tokenizer.encode(t), n) for t, n in zip(texts, lengths, strict=True)]
    requests.append(completion_request(tokenizer.encode("Hello"), 50, stop=["e"]))
    engine = Engine(loaded.model, tokenizer, max_batch_size=3)
    got = run_engine(engine, requests)
    for text, request, answer in zip([*texts, "Hello"], requests, got, strict=True):
        alone = complete(loaded.model, tokenizer, [text], request.max_tokens, temperature=0, stop=request.stop)[0]
        assert answer[0] == alone
    assert calls["join"] > 0 and calls["keep_rows"] > 0 and calls["drop_front"] > 0  # each path was taken
    assert calls["joined in place"] > 0


def test_kv_cache_keep_rows_moves_only_the_rows_that_fill_places():
    """fill_order: the rows from the end take the places of the rows that leave; keep_rows then copies only
    those, within the same buffers. Any other order still gives the rows asked for, in that order."""
    assert KVCache.fill_order([0, 1, 2, 4, 5]) == [0, 1, 2, 5, 4]
    assert KVCache.fill_order([1, 3]) == [3, 1] and KVCache.fill_order([0, 1]) == [0, 1]
    keys, values = torch.randn(2, 6, 2, 5, 4).unbind(0)  # (B, nh, T, hs)
    for order in (KVCache.fill_order([0, 2, 3, 5]), [5, 0, 2]):
        cache = KVCache(8)
        cache.update(keys, values)
        buffer = cache.k.data_ptr()
        cache.keep_rows(torch.tensor(order))
        assert torch.equal(cache.k[:, :, :5], keys[order]) and torch.equal(cache.v[:, :, :5], values[order])
        assert (cache.k.data_ptr() == buffer) == (order != [5, 0, 2])  # in place, or new buffers


def test_kv_cache_join_uses_the_room_rows_left():
    """After rows left (keep_rows in place), rows joining a longer batch go into the buffers' free rows, left-padded
    with zeros, and the batch's rows are not copied; a longer newcomer, or more rows than there is room for, gives
    a new cache with the same contents."""
    keys, values = torch.randn(2, 4, 2, 6, 3).unbind(0)  # (B, nh, T, hs)
    for new_rows, new_length, in_place in ((2, 4, True), (1, 6, True), (3, 4, False), (1, 7, False)):
        batch = KVCache(8)
        batch.update(keys, values)
        batch.keep_rows(torch.tensor(KVCache.fill_order([1, 3])))  # rows 3, 1 left in place; room for 2
        fresh = KVCache(8)
        fresh_keys, fresh_values = torch.randn(2, new_rows, 2, new_length, 3).unbind(0)
        fresh.update(fresh_keys, fresh_values)
        joined = KVCache.join(batch, fresh)
        assert (joined is batch) == in_place
        length = max(6, new_length)
        assert joined.length == length and joined.k.shape[0] == 2 + new_rows
        for got, old, new in ((joined.k, keys, fresh_keys), (joined.v, values, fresh_values)):
            assert torch.equal(got[:2, :, length - 6 : length], old[[3, 1]])
            assert torch.equal(got[2:, :, length - new_length : length], new)
            assert not got[:2, :, : length - 6].any() and not got[2:, :, : length - new_length].any()


def test_seeded_sampling_does_not_depend_on_the_batch(small_context_model):
    loaded = loading.load(str(small_context_model))
    ids = loaded.tokenizer.encode("Once upon a time")
    request = completion_request(ids, 30, temperature=1.0, n=2, seed=7, top_k=40, top_p=0.9)
    alone = run_engine(Engine(loaded.model, loaded.tokenizer), [request])[0]
    others = [completion_request(loaded.tokenizer.encode(t), 25, temperature=0.8) for t in ("a", "b c", "d e f")]
    together = run_engine(Engine(loaded.model, loaded.tokenizer, max_batch_size=8), [others[0], request, *others[1:]])
    assert together[1] == alone
    assert alone[0] != alone[1]  # the two choices draw differently (seed + choice index)
    other_seed = completion_request(ids, 30, temperature=1.0, n=2, seed=8, top_k=40, top_p=0.9)
    assert run_engine(Engine(loaded.model, loaded.tokenizer), [other_seed])[0] != alone


def test_a_whole_answer_comes_in_one_event_and_a_stream_token_by_token(small_context_model):
    """The engine wakes the event loop once per step, not once per token: a request that is not streamed gets each
    choice in one event when it ends (its tokens' logprobs included), a stream its tokens as they come; the texts
    are the same, and the logprobs to rounding (the two rows may share their prompt's pass or not)."""
    loaded = loading.load(str(small_context_model))
    whole = dataclasses.replace(completion_request(loaded.tokenizer.encode("Once upon a time"), 20), logprobs=2)
    stream = dataclasses.replace(whole, stream=True)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=4)

    async def main():
        loop = asyncio.get_running_loop()

        async def events(request):
            job = Job(request, loop)
            engine.submit(job)
            got = [await job.events.get()]
            while got[-1].finish_reason is None:
                got.append(await job.events.get())
            return got

        return await asyncio.gather(events(whole), events(stream))

    engine.start()
    try:
        whole_events, stream_events = asyncio.run(main())
    finally:
        engine.stop()
    assert len(whole_events) == 1 and whole_events[0].finish_reason == "length"
    assert whole_events[0].completion_tokens == 20 and len(whole_events[0].logprobs) == 20
    assert len(stream_events) > 1
    assert "".join(event.text for event in stream_events) == whole_events[0].text
    streamed = [entry for event in stream_events for entry in event.logprobs or []]
    whole_entries = whole_events[0].logprobs
    assert [entry.token for entry in streamed] == [entry.token for entry in whole_entries]
    for a, b in zip(streamed, whole_entries, strict=True):  # rows of one batch or of two: equal to rounding
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and list(a.top) == list(b.top)
        assert list(a.top.values()) == pytest.approx(list(b.top.values()), abs=1e-5)


def test_the_engine_thread_has_the_cores_openmp_workers_to_itself():
    """A thread that has run parallel CPU ops keeps a team of OpenMP workers (libgomp, PyTorch's OpenMP on Linux);
    the server's main thread loaded the model, so the engine lets the main thread's team go before it starts (with
    more workers than cores, libgomp's idle workers sleep, and every parallel op waits to wake them)."""
    script = """
import os, time, torch
from gpt2scratch.runtime import release_openmp_threads
torch.set_num_threads(2)
torch.randn(4_000_000).exp_().sum()  # a parallel op: this thread gets its team
before = len(os.listdir("/proc/self/task"))
released = release_openmp_threads()
for _ in range(100):  # the workers exit on their own
    if len(os.listdir("/proc/self/task")) < before:
        break
    time.sleep(0.01)
print(released, before, len(os.listdir("/proc/self/task")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    released, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert released and after == before - 1, out  # two threads: the team had one worker beside this thread


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution sample_next draws from, written out: top-k, then top-p over the renormalised rest."""
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept = order[:top_k] if top_k else order
    mass = probs[kept] / probs[kept].sum()
    cumulative = 0.0
    for token, p in zip(kept.tolist(), mass.tolist(), strict=True):
        keep[token] = True
        cumulative += p
        if cumulative >= top_p:
            break
    filtered = torch.where(keep, probs, torch.zeros_like(probs))
    return filtered / filtered.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.6)])
def test_sample_rows_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    """An evenly spread grid of N uniforms lands on each token N x its probability times (to within one)."""
    torch.manual_seed(1)
    logits = torch.randn(1, 40) * 2
    expected = reference_probs(logits[0], temperature, top_k, top_p)
    N = 4000
    uniform = (torch.arange(N) + 0.5) / N
    rows = logits.expand(N, -1)
    tokens = sample_rows(rows, torch.full((N,), temperature), torch.full((N,), top_k), torch.full((N,), top_p), uniform)
    counts = torch.bincount(tokens, minlength=40).float()
    assert torch.all((counts - expected * N).abs() <= 1.5), (counts, expected * N)


def test_sample_rows_greedy_rows_and_top_k_1_are_argmax():
    logits = torch.randn(4, 50)
    tokens = sample_rows(
        logits, torch.tensor([0.0, 1.0, 0.0, 2.0]), torch.tensor([0, 1, 7, 1]), torch.ones(4), torch.rand(4)
    )
    assert tokens.tolist() == logits.argmax(-1).tolist()


# ---- the HTTP API, in process ----------------------------------------------------------------------------------


def test_completion_answer_has_openai_shape(client, model_dir):
    response = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": ["Hello", "ROMEO:"], "max_tokens": 7, "n": 2, "seed": 1}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    tokenizer = loading.load(str(model_dir)).tokenizer
    prompt_tokens = len(tokenizer.encode("Hello")) + len(tokenizer.encode("ROMEO:"))
    completion_tokens = sum(len(tokenizer.encode(c["text"])) for c in body["choices"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 4 * 7 and usage["completion_tokens"] >= completion_tokens - 4


def test_greedy_completion_equals_generation_alone(client, model_dir):
    loaded = loading.load(str(model_dir))
    body = {"prompt": "The history of the world", "max_tokens": 20, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    assert (
        answer["choices"][0]["text"] == complete(loaded.model, loaded.tokenizer, [body["prompt"]], 20, temperature=0)[0]
    )
    ids = loaded.tokenizer.encode(body["prompt"])  # a prompt given as token ids gives the same
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert by_ids["choices"][0]["text"] == answer["choices"][0]["text"]
    echo = client.post("/v1/completions", json={**body, "echo": True}).json()
    assert echo["choices"][0]["text"] == body["prompt"] + answer["choices"][0]["text"]
    zero = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    assert zero["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}


def parse_stream(lines) -> tuple[list[dict], bool]:
    chunks, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        chunks.append(json.loads(line[6:]))
    return chunks, done


def test_stream_is_openai_chunks_ending_with_done(client):
    body = {"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0, "n": 2}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks, done = parse_stream(response.iter_lines())
    assert done
    texts, finish = ["", ""], [None, None]
    for chunk in chunks:
        assert chunk["object"] == "text_completion" and chunk["id"] == chunks[0]["id"]
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            finish[choice["index"]] = finish[choice["index"]] or choice["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert finish == [c["finish_reason"] for c in whole["choices"]]
    assert len(chunks) > 2  # token by token, not all at once
    with client.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        chunks, done = parse_stream(response.iter_lines())
    assert done and chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


BAD_REQUESTS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["ok", 3]}, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "x " * 1100}, "prompt"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),  # 0-5, as OpenAI
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": [[1, 2, 60000]]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "top_k": 2**64}, "top_k"),  # every integer is bounded before it reaches a tensor
    ({"prompt": "x", "seed": -(2**64)}, "seed"),
    ({"prompt": [[1] * 1025]}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_field_and_the_server_goes_on(client, body, param):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error" and error["message"]
    good = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert good.status_code == 200 and len(good.json()["choices"]) == 1


def test_invalid_json_unknown_model_path_and_method(client):
    response = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = client.post("/v1/completions", content=b"[1, 2]")
    assert response.status_code == 400 and "object" in response.json()["error"]["message"]
    response = client.post("/v1/completions", content=b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}')
    assert response.status_code == 413 and "MiB" in response.json()["error"]["message"]
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "'tiny'" in response.json()["error"]["message"]
    response = client.get("/v1/chat/nothing")
    assert response.status_code == 404 and "error" in response.json()
    response = client.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_models_health_and_page(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["context_length"] == 1024
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/v1/models/other").status_code == 404
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '"model": "tiny"' in html
    assert "http://" not in html and "https://" not in html and "src=" not in html  # self-contained: nothing fetched


def test_api_key(model_dir):
    from fastapi.testclient import TestClient

    app = build_app(loading.load(str(model_dir)), name="tiny", api_key="s3cret")
    with TestClient(app) as client:
        body = {"prompt": "x", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert client.get("/v1/models", headers=headers).status_code == 401
        ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_a_request_larger_than_the_queue_is_refused(model_dir):
    from fastapi.testclient import TestClient

    app = build_app(loading.load(str(model_dir)), name="tiny", max_queue=2)
    with TestClient(app) as client:
        response = client.post("/v1/completions", json={"prompt": "x", "n": 3})
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        assert client.post("/v1/completions", json={"prompt": "x", "n": 2}).status_code == 200


# ---- a real server (`gpt2scratch serve` in a subprocess) ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir):
    process = ServerProcess(model_dir, "--model-name", "tiny", "--dtype", "fp32")  # compared with fp32 references
    yield process
    process.stop()


def test_serve_binds_loopback_and_prints_where(server):
    # listening on 127.0.0.1 only: the port answers there, and nothing listens on the other addresses
    assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200
    outside = socket.gethostbyname(socket.gethostname())
    if not outside.startswith("127."):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{outside}:{server.port}/health", timeout=2)


def test_openai_client_completes_and_streams(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    answer = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, temperature=0)
    text = answer.choices[0].text
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
    pieces = []
    for chunk in client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    ):
        pieces += [c.text for c in chunk.choices]
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text and len(pieces) > 1
    assert usage.completion_tokens == answer.usage.completion_tokens
    batch = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=5, seed=3)
    assert len(batch.choices) == 4
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert error.value.body["param"] == "temperature"


def test_32_concurrent_clients_lose_no_request(server):
    """32 clients at once, 3 requests each (streamed and not): every answer is 200 and complete."""
    before = server.health()["requests"]

    def client_run(i: int) -> list[str]:
        problems = []
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for j in range(3):
                body = {"prompt": f"Client {i} request {j}", "max_tokens": 16, "seed": i * 10 + j, "n": 1 + j % 2}
                if j == 1:
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        if response.status_code != 200:
                            problems.append(f"stream status {response.status_code}")
                            continue
                        chunks, done = parse_stream(response.iter_lines())
                    finished = sum(c["finish_reason"] is not None for chunk in chunks for c in chunk["choices"])
                    if not done or finished != body["n"]:
                        problems.append(f"stream incomplete: done={done} finished={finished}")
                else:
                    response = http.post("/v1/completions", json=body)
                    if response.status_code != 200 or len(response.json()["choices"]) != body["n"]:
                        problems.append(f"status {response.status_code}: {response.text[:200]}")
        return problems

    with ThreadPoolExecutor(32) as pool:
        problems = [p for result in pool.map(client_run, range(32)) for p in result]
    assert problems == []
    health = server.health()
    assert health["requests"] - before == 96
    assert health["mean_batch_size"] > 1  # requests that arrived together shared forward passes


def test_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.health()["tokens_generated"]
    body = {"prompt": "ROMEO:", "max_tokens": 1000, "temperature": 1.0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    # leaving the block closes the connection after the first chunk
    deadline = time.time() + 20
    while server.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    health = server.health()
    assert health["running"] == 0 and health["waiting"] == 0
    assert health["tokens_generated"] - before < 900  # it stopped long before its 1000 tokens
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200


def test_full_queue_answers_429_and_the_server_recovers(model_dir):
    server = ServerProcess(model_dir, "--max-batch-size", "1", "--max-queue", "2", "--model-name", "tiny")
    try:

        def send(i: int) -> tuple[int, dict, str | None]:
            response = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200}, timeout=120)
            return response.status_code, response.json(), response.headers.get("retry-after")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, range(8)))
        statuses = sorted(status for status, _, _ in results)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 3  # 1 running + 2 waiting at least
        for status, body, retry_after in results:
            if status == 429:
                assert body["error"]["type"] == "server_busy" and "--max-queue" in body["error"]["message"]
                assert retry_after is not None
            else:
                assert len(body["choices"]) == 1
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_load_test_script_reports_no_failures(server):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", server.url, "--model-name", "tiny"]
        + ["--clients", "8", "--requests", "2", "--max-tokens", "8", "--max-tokens-up-to", "16", "--time-limit", "60"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("server"))
    sent, failed, rejected = map(int, row.split()[1:4])
    assert (sent, failed, rejected) == (16, 0, 0)


def test_503_when_the_engine_has_stopped(model_dir):
    from fastapi.testclient import TestClient

    app = build_app(loading.load(str(model_dir)), name="tiny")
    with TestClient(app) as client:
        app.state.engine.stop()
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
        assert client.get("/health").status_code == 503


def test_client_that_disconnects_while_waiting_for_a_whole_answer_frees_its_slot(server):
    before = server.health()["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s and closes the connection
        httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1000}, timeout=0.3)
    deadline = time.time() + 20
    while server.health()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.health()["running"] == 0
    assert server.health()["tokens_generated"] - before < 900


def test_serve_refuses_a_port_in_use_before_loading(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(model_dir), "--port", str(port), timeout=120)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "Serving" not in result.stdout


# ---- hostile and careless clients -------------------------------------------------------------------------------


def test_a_failing_row_fails_alone(small_context_model, monkeypatch):
    """A request whose sampling fails while others decode gets an error; the others finish as they would alone."""
    loaded = loading.load(str(small_context_model))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=8)
    real_sample = engine._sample

    def sample(rows, logits, uniform):
        if any(row.job.request.top_k == 13 for row in rows):
            raise RuntimeError("this row's settings break the sampler")
        return real_sample(rows, logits, uniform)

    monkeypatch.setattr(engine, "_sample", sample)
    ids = loaded.tokenizer.encode("Once upon a time")
    good = [completion_request(ids, 20), completion_request(loaded.tokenizer.encode("ROMEO:"), 25)]
    bad = completion_request(ids, 20, temperature=1.0, top_k=13)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(request, loop) for request in (good[0], bad, good[1])]
        for job in jobs:
            engine.submit(job)
        results = []
        for job in jobs:
            text, finish = "", None
            while finish is None:
                event = await job.events.get()
                text, finish = text + event.text, event.finish_reason
            results.append((text, finish))
        return results

    engine.start()
    try:
        first, failed, second = asyncio.run(main())
    finally:
        engine.stop()
    assert failed[1] == "error" and "break the sampler" in failed[0]
    for (text, finish), request, prompt in zip((first, second), good, ("Once upon a time", "ROMEO:"), strict=True):
        assert (
            finish == "length"
            and text == complete(loaded.model, loaded.tokenizer, [prompt], request.max_tokens, temperature=0)[0]
        )


def test_a_huge_prompt_is_refused_without_encoding_it_and_off_the_event_loop(model_dir, monkeypatch):
    """A 3.9 MB prompt (under the body limit) cannot fit 1,024 tokens: refused before it is tokenized in full;
    what is tokenized is tokenized in a worker thread, not on the event loop that serves everyone."""
    from fastapi.testclient import TestClient

    loaded = loading.load(str(model_dir))
    encoded: list[tuple[int, bool]] = []  # (characters, on the event loop?)
    real_encode = loaded.tokenizer.encode

    def encode(text):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        encoded.append((len(text), on_loop))
        return real_encode(text)

    monkeypatch.setattr(loaded.tokenizer, "encode", encode)
    with TestClient(build_app(loaded, name="tiny")) as client:
        response = client.post("/v1/completions", json={"prompt": "to be or not " * 300_000, "max_tokens": 1})
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert "at least" in response.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "x y", "max_tokens": 1}).status_code == 200
    assert max(length for length, _ in encoded) < 1_000_000
    assert encoded and not any(on_loop for _, on_loop in encoded)


def test_a_chunked_body_is_not_read_past_the_limit(server):
    """200 MiB with no Content-Length, in 1 MiB chunks: the server answers 413 after about 4 MiB and never holds
    the body in memory (its peak resident memory grows by far less than 200 MiB)."""

    def peak_rss_mib() -> float:
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    before = peak_rss_mib()
    body = (b" " * 2**20 for _ in range(200))
    try:
        response = httpx.post(server.url + "/v1/completions", content=body, timeout=120)
        assert response.status_code == 413 and response.json()["error"]["message"].startswith("the request body")
    except httpx.TransportError:  # the server closed the connection while the client was still sending
        pass
    assert peak_rss_mib() - before < 50, (before, peak_rss_mib())
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"[1, 2"],
    ids=["deep", "5000 digits", "not utf-8", "truncated"],
)
def test_unparseable_bodies_get_an_openai_json_400(client, raw):
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_top_p_0_and_tiny_temperatures_are_greedy(client):
    """In the API as in generate(): no NaN from dividing by 1e-40, and top_p 0 keeps the likeliest token."""
    body = {"prompt": "Once upon a time", "max_tokens": 12}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for sampling in ({"temperature": 1e-40}, {"top_p": 0}, {"temperature": 1.5, "top_p": 0, "seed": 3}):
        answer = client.post("/v1/completions", json={**body, **sampling})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == greedy, sampling


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)
PLAUSIBLE = {  # values near the valid ones, so that generated bodies also get past the first checks
    "prompt": st.text(max_size=80) | st.lists(st.text(max_size=20), max_size=3) | st.lists(st.integers(-5, 60000)),
    "max_tokens": st.integers(-3, 70),
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 1e-45, 1e-40, 2]),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 60000) | st.sampled_from([2**63, 2**64]),
    "n": st.integers(-1, 20),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "seed": st.integers(),
    "stream": st.booleans(),
    "echo": st.booleans(),
}
NEAR_VALID = st.fixed_dictionaries(
    {"prompt": st.text(max_size=40) | st.lists(st.integers(0, 50256), min_size=1, max_size=8)},
    optional={
        "max_tokens": st.integers(0, 20),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "top_k": st.integers(-1, 100),
        "n": st.integers(1, 3),
        "stop": st.lists(st.text(max_size=3), max_size=4),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stream": st.booleans(),
        "echo": st.booleans(),
    },
)
BODIES = (
    JSON
    | NEAR_VALID
    | st.dictionaries(
        st.sampled_from([*sorted(KNOWN), "frobnicate"]),
        st.deferred(lambda: JSON),
        max_size=6,
    ).flatmap(
        lambda body: st.fixed_dictionaries(
            {}, optional={key: PLAUSIBLE[key] for key in PLAUSIBLE if key not in body}
        ).map(lambda plausible: {**body, **plausible})
    )
)


@pytest.fixture(scope="module")
def small_client(small_context_model):
    from fastapi.testclient import TestClient

    with TestClient(build_app(loading.load(str(small_context_model)), name="ctx64")) as test_client:
        yield test_client


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_generated_request_bodies_never_get_a_5xx(small_client, body):
    """Whatever JSON a client sends: a 4xx in OpenAI's format or an answer; never a 5xx."""
    raw = json.dumps(body).encode()  # NaN and Infinity as Python writes them: not JSON, but clients send them
    response = small_client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
    elif not body.get("stream"):
        assert response.json()["choices"]


def test_the_server_is_healthy_after_generated_bodies(small_client):
    assert small_client.get("/health").json()["status"] == "ok"
    good = small_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3


# ---- log-probabilities and the tokenizer endpoints (what evaluators use) ---------------------------------------------


def test_logprobs_are_the_models_and_do_not_depend_on_the_batch(model_dir):
    """echo + logprobs scores the prompt exactly as the model alone does (one log-softmax in float32 of an unbatched
    forward pass); generated tokens' logprobs agree within 1e-5; the same request inside a busy batch gets the same
    prompt values, bit for bit."""
    from fastapi.testclient import TestClient

    loaded = loading.load(str(model_dir))
    body = {"prompt": "Once upon a time there was", "max_tokens": 6, "logprobs": 3, "echo": True, "temperature": 0}
    with TestClient(build_app(loaded, name="tiny", max_batch_size=8)) as client:
        alone = client.post("/v1/completions", json=body).json()["choices"][0]
        others = [{"prompt": p, "max_tokens": 40, "temperature": 0.7, "seed": 1} for p in ("a b", "x", "ROMEO: hi")]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.post, "/v1/completions", json=o) for o in others[:2]]
            futures.append(pool.submit(client.post, "/v1/completions", json=body))
            futures += [pool.submit(client.post, "/v1/completions", json=o) for o in others[2:]]
            together = futures[2].result().json()["choices"][0]
            assert all(f.result().status_code == 200 for f in futures)
    ids = loaded.tokenizer.encode(body["prompt"])
    logprobs = alone["logprobs"]
    n = len(ids)
    assert len(logprobs["tokens"]) == n + 6 and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None and logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]
    assert "".join(logprobs["tokens"]) == alone["text"]
    generated = loaded.tokenizer.encode(alone["text"])[n:]

    def model_logprobs(tokens):  # the model alone, unbatched, on these tokens: each token's log-probability
        with torch.no_grad():
            reference = torch.log_softmax(loaded.model(torch.tensor([tokens]))[0][0].float(), dim=-1)
        return [reference[t - 1, token].item() for t, token in enumerate(tokens) if t > 0]

    # The prompt: exactly the model's values on the prompt. (The same prompt inside a longer sequence may differ in
    # the last bit: a matmul's rounding can depend on its row count, as MKL's does on an AVX2-only CPU.)
    assert logprobs["token_logprobs"][1:n] == model_logprobs(ids)
    expected = model_logprobs(ids + generated)
    assert max(abs(a - b) for a, b in zip(logprobs["token_logprobs"][n:], expected[n - 1 :], strict=True)) < 1e-5
    for value, top in zip(logprobs["token_logprobs"][n:], logprobs["top_logprobs"][n:], strict=True):
        assert len(top) == 3 and value == max(top.values())  # greedy: the token is the likeliest, same value
    assert together["logprobs"]["token_logprobs"][:n] == logprobs["token_logprobs"][:n]
    assert together["text"] == alone["text"]
    assert max(abs(a - b) for a, b in zip(together["logprobs"]["token_logprobs"][n:], logprobs["token_logprobs"][n:],
                                          strict=True)) < 1e-5  # fmt: skip


def test_logprobs_stream_and_prompt_scoring_with_the_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    scored = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == "To be, or not" and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.tokens == ["To", " be", ",", " or", " not"]
    assert all(isinstance(v, float) for v in choice.logprobs.token_logprobs[1:])
    whole = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logprobs=2)
    streamed = [c.choices[0] for c in client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logprobs=2, stream=True) if c.choices]  # fmt: skip
    tokens = [token for c in streamed if c.logprobs for token in c.logprobs.tokens]
    values = [value for c in streamed if c.logprobs for value in c.logprobs.token_logprobs]
    assert tokens == whole.choices[0].logprobs.tokens and values == whole.choices[0].logprobs.token_logprobs
    assert len(tokens) == whole.usage.completion_tokens  # every generated token, <|endoftext|> included


def test_tokenizer_endpoints(model_dir):
    from fastapi.testclient import TestClient

    loaded = loading.load(str(model_dir))
    with TestClient(build_app(loaded, name="tiny", api_key="k")) as client:
        auth = {"Authorization": "Bearer k"}
        assert client.get("/tokenizer_info").status_code == 401
        info = client.get("/tokenizer_info", headers=auth).json()
        assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 1024
        text = "Hello world<|endoftext|> and more"
        tokenized = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=auth).json()
        assert tokenized["tokens"] == loaded.tokenizer.encode(text) and tokenized["count"] == len(tokenized["tokens"])
        assert tokenized["tokens"][2] == 50256 and tokenized["max_model_len"] == 1024
        back = client.post("/detokenize", json={"tokens": tokenized["tokens"]}, headers=auth).json()
        assert back == {"prompt": text}
        for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"), ("/detokenize", {"tokens": [1, 60000]},
                                                                              "tokens")):  # fmt: skip
            response = client.post(path, json=body, headers=auth)
            assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_generated_end_of_text_token_has_its_logprob(model_dir):
    """A completion that ends at once with <|endoftext|> still lists that token (evaluators count on the last
    entry being the generated token)."""
    from fastapi.testclient import TestClient

    loaded = loading.load(str(model_dir))
    with torch.no_grad():  # every position's hidden state is the same vector, and <|endoftext|> scores highest on it
        loaded.model.transformer.ln_f.weight.zero_()
        loaded.model.transformer.ln_f.bias.fill_(1.0)
        loaded.model.lm_head.weight[loaded.tokenizer.eot_id] = 1.0
    with TestClient(build_app(loaded, name="tiny")) as client:
        body = {"prompt": "Hi there", "max_tokens": 5, "logprobs": 1, "temperature": 0, "echo": True}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "Hi there"
    assert choice["logprobs"]["tokens"] == ["Hi", " there", "<|endoftext|>"]
    assert choice["logprobs"]["token_logprobs"][-1] == max(choice["logprobs"]["top_logprobs"][-1].values())
