"""Load-test `gpt2scratch serve`: N concurrent clients, each sending several completions (half of them streamed).

    python bench/serve_load.py                          # random `mini` model, 32 clients x 4 requests
    python bench/serve_load.py --model runs/shakespeare --clients 32 --requests 8
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-name shakespeare   # a server already running
    python bench/serve_load.py --preset gpt2 --max-tokens 16 --max-tokens-up-to 240   # rows leave and join one by one
    git worktree add /tmp/before COMMIT && python bench/serve_load.py --baseline-src /tmp/before/src  # vs that code

Without --url it starts two servers on free loopback ports, one with continuous batching (--max-batch-size,
default 16) and one with batching off (batch 1), and loads the reference, transformers' GPT2LMHeadModel
.generate() on the same weights serving the same kind of requests one after another (what a server without
batching does); it runs the three phases in turn for --rounds rounds and prints median tokens/s side by side,
with ratios. Loopback only; every phase stops issuing requests after --time-limit seconds.

Reported per phase: requests sent, failed or malformed answers (must be 0), 429s (queue full), generated
tokens, wall time, tokens/s, latency percentiles (whole request) and time to first token for streams.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "ROMEO:",
    "The history of the world",
    "Once upon a time, in a small village by the sea,",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "To be, or not to be",
    "In the beginning",
    "The quick brown fox",
    "It was the best of times, it was the worst of times,",
]


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tokens: int = 0
    sent: int = 0
    failed: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0


async def one_request(client: httpx.AsyncClient, body: dict, result: Result) -> None:
    result.sent += 1
    started = time.perf_counter()
    n_choices = body.get("n", 1)
    try:
        if not body["stream"]:
            response = await client.post("/v1/completions", json=body)
            if response.status_code == 429:
                result.rejected += 1
                return
            answer = response.json()
            assert response.status_code == 200, f"status {response.status_code}: {answer}"
            assert len(answer["choices"]) == n_choices, "wrong number of choices"
            assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"]), "no finish_reason"
            result.tokens += answer["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code == 429:
                    result.rejected += 1
                    await response.aread()
                    return
                assert response.status_code == 200, f"status {response.status_code}"
                finished, done, usage, first = 0, False, None, None
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        continue
                    message = json.loads(data)
                    assert "error" not in message, message
                    if message.get("usage"):
                        usage = message["usage"]
                    for c in message["choices"]:
                        if first is None and c["text"]:
                            first = time.perf_counter() - started
                        finished += c["finish_reason"] is not None
                assert done, "stream did not end with data: [DONE]"
                assert finished == n_choices, "a choice never finished"
                assert usage is not None, "no usage chunk"
                result.tokens += usage["completion_tokens"]
                if first is not None:
                    result.first_token.append(first)
    except Exception as error:  # a failed or malformed answer: counted, the load goes on
        result.failed += 1
        result.errors.append(f"{type(error).__name__}: {error}")
        return
    result.latencies.append(time.perf_counter() - started)


async def run_load(url: str, model: str, args: argparse.Namespace, api_key: str | None = None) -> Result:
    result = Result()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    deadline = time.perf_counter() + args.time_limit

    async def client_task(client_id: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(client_id)
        for i in range(args.requests):
            if time.perf_counter() > deadline:
                return
            body = {
                "model": model,
                "prompt": rng.choice(PROMPTS),
                "max_tokens": draw_max_tokens(rng, args),
                "temperature": 1.0,
                "top_k": 50,
                "seed": client_id * 1000 + i,
                "stream": i % 2 == 1,
            }
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            await one_request(client, body, result)

    timeout = httpx.Timeout(args.time_limit + 60)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_task(c, client) for c in range(args.clients)))
        result.wall = time.perf_counter() - started
    return result


def draw_max_tokens(rng: random.Random, args: argparse.Namespace) -> int:
    """--max-tokens, or with --max-tokens-up-to a length drawn from [--max-tokens, --max-tokens-up-to]: requests
    that end at different steps, so that rows leave and join a running batch one by one."""
    if args.max_tokens_up_to is None:
        return args.max_tokens
    return rng.randint(args.max_tokens, max(args.max_tokens, args.max_tokens_up_to))


def lengths(args: argparse.Namespace) -> str:
    return str(args.max_tokens) if args.max_tokens_up_to is None else f"{args.max_tokens}-{args.max_tokens_up_to}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def merge(results: list[Result]) -> Result:
    """Several rounds of one phase as one: counts summed, latencies pooled."""
    merged = Result()
    for r in results:
        merged.latencies += r.latencies
        merged.first_token += r.first_token
        merged.errors += r.errors
        merged.tokens += r.tokens
        merged.sent += r.sent
        merged.failed += r.failed
        merged.rejected += r.rejected
        merged.wall += r.wall
    return merged


def report(name: str, r: Result, tok_s: float | None = None) -> float:
    tok_s = tok_s if tok_s is not None else (r.tokens / r.wall if r.wall else 0.0)
    ms = lambda values, q: percentile(values, q) * 1000  # noqa: E731
    print(
        f"{name:<26} {r.sent:>5} {r.failed:>6} {r.rejected:>5} {r.tokens:>7} {r.wall:>7.1f} {tok_s:>8.1f} "
        f"{ms(r.latencies, 50):>8.0f} {ms(r.latencies, 90):>8.0f} {ms(r.latencies, 99):>8.0f} "
        f"{ms(r.first_token, 50):>9.0f}"
    )
    for error in r.errors[:5]:
        print(f"    failure: {error}")
    return tok_s


def random_model(preset: str, folder: Path, src: str | None = None) -> str:
    """A random model of `preset`'s shape, written by this checkout or, with `src`, by the gpt2scratch in that
    folder: an older checkout may not read the state.json of a newer one (keys it does not know), while this one
    reads older folders."""
    code = (
        "import sys; from gpt2scratch.config import resolve_config; from gpt2scratch.testing import write_random_model;"
        " write_random_model(sys.argv[2], resolve_config(sys.argv[1]).model)"
    )
    subprocess.run([sys.executable, "-c", code, preset, str(folder)], check=True, env=_env_with(src))
    return str(folder)


def _env_with(src: str | None) -> dict[str, str]:
    """The environment, with `src` (another checkout's src/ folder) first on PYTHONPATH when given."""
    if src is None:
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@functools.cache
def _knows_dtype(src: str) -> bool:
    """Whether the checkout's `serve` takes --dtype (its `auto` would pick bf16 on a CPU that has it)."""
    usage = subprocess.run(
        [sys.executable, "-m", "gpt2scratch", "serve", "--help"], capture_output=True, text=True, env=_env_with(src)
    )
    return "--dtype" in usage.stdout


def start_server(model_dir: str, max_batch_size: int, max_queue: int, variant: str = "fp32", src: str | None = None):
    """`gpt2scratch serve` with --dtype D, or with --dtype D --compile for a variant "D+compile"; with `src`, the
    fp32 server of the gpt2scratch in that folder (another checkout's src/)."""
    from gpt2scratch.testing import ServerProcess

    options = ["--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue)]
    if src is not None:  # fp32 (checkouts older than --dtype serve fp32; later ones are told to)
        options += ["--dtype", "fp32"] if _knows_dtype(src) else []
        return ServerProcess(model_dir, *options, "--model-name", "bench", "--device", "cpu", env=_env_with(src))

    dtype, _, compiled = variant.partition("+")
    options += ["--dtype", dtype] + (["--compile"] if compiled else [])
    start_timeout = 900 if compiled else 120  # compiling the decoding steps takes minutes on a first run
    return ServerProcess(model_dir, *options, "--model-name", "bench", "--device", "cpu", start_timeout=start_timeout)


class TransformersSerial:
    """The reference: transformers' generate() on the same weights, one request after another (no batching)."""

    def __init__(self, model_dir: str):
        from gpt2scratch import loading
        from gpt2scratch.hf import hf_model_from_gpt

        self.loaded = loading.load(model_dir)
        self.model = hf_model_from_gpt(self.loaded.model).eval()

    def run(self, args: argparse.Namespace, round_index: int) -> Result:
        import torch

        eot = self.loaded.tokenizer.eot_id
        result = Result()
        deadline = time.perf_counter() + args.time_limit
        started = time.perf_counter()
        rng = random.Random(round_index)
        for i in range(args.reference_requests):
            if time.perf_counter() > deadline:
                break
            ids = torch.tensor([self.loaded.tokenizer.encode(rng.choice(PROMPTS))])
            max_new_tokens = draw_max_tokens(rng, args)
            t0 = time.perf_counter()
            torch.manual_seed(round_index * 1000 + i)
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=50,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eot,
                    pad_token_id=eot,
                )
            result.sent += 1
            result.tokens += out.size(1) - ids.size(1)
            result.latencies.append(time.perf_counter() - t0)
        result.wall = time.perf_counter() - started
        return result


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url must be a loopback address (127.0.0.1, ::1 or localhost), not {host!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint, run or Hugging Face folder (default: random --preset)")
    parser.add_argument("--preset", default="mini", help="shape of the random model without --model (default mini)")
    parser.add_argument("--url", help="load-test a server already running on loopback (no comparison then)")
    parser.add_argument("--model-name", default="bench", help="model id to send with --url")
    parser.add_argument("--api-key", default=os.environ.get("GPT2SCRATCH_API_KEY"))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--max-tokens-up-to", type=int, help="each request's max_tokens drawn from [--max-tokens, this] (seeded)"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--reference-requests", type=int, default=16, help="requests timed with transformers")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per phase before new requests stop")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the phases")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16", "int8", "bf16+compile", "int8+compile"],
        help="our servers: --dtype D at --max-batch-size (D+compile: --dtype D --compile; D@N: at batch N)",
    )
    parser.add_argument(
        "--baseline-src",
        help="also the fp32 server of another checkout (its src/ folder, e.g. a git worktree of an earlier commit; "
        "given --dtype fp32 where it knows the flag), with ratios of ours to it; the random model is then written "
        "by that checkout, which may not read a newer one's folder",
    )
    args = parser.parse_args()
    header = (
        f"{'':<26} {'sent':>5} {'failed':>6} {'429':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>8} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'ttft p50':>9}"
    )
    if args.url:
        check_loopback(args.url)
        print(f"{args.clients} clients x {args.requests} requests, max_tokens {lengths(args)} -> {args.url}")
        print(header)
        result = asyncio.run(run_load(args.url.rstrip("/"), args.model_name, args, args.api_key))
        report("server", result)
        sys.exit(1 if result.failed else 0)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or random_model(args.preset, Path(tmp) / "model", args.baseline_src)
        print(
            f"{model_dir}: {args.clients} clients x {args.requests} requests (half streamed), max_tokens "
            f"{lengths(args)}, sampling top-k 50; CPU, {os.cpu_count()} cores; {args.rounds} interleaved rounds, "
            "tok/s = median over rounds, latencies pooled"
        )
        reference = TransformersSerial(model_dir)
        servers = {}
        try:
            for spec in args.dtypes:  # one after the other: compiling ones would slow each other down
                variant, _, batch = spec.partition("@")
                batch = int(batch or args.max_batch_size)
                servers[f"ours {variant}, batch {batch}"] = start_server(model_dir, batch, args.max_queue, variant)
            servers["ours fp32, batch 1"] = start_server(model_dir, 1, args.max_queue)
            if args.baseline_src:
                baseline = f"baseline fp32, batch {args.max_batch_size}"
                servers[baseline] = start_server(model_dir, args.max_batch_size, args.max_queue, src=args.baseline_src)
            results: dict[str, list[Result]] = {name: [] for name in [*servers, "transformers, serial"]}
            for round_index in range(args.rounds):
                for name, server in servers.items():
                    results[name].append(asyncio.run(run_load(server.url, "bench", args)))
                results["transformers, serial"].append(reference.run(args, round_index))
            mean_batch = {name: server.health()["mean_batch_size"] for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        print(header)
        rates = {}
        for name, rounds in results.items():
            rates[name] = report(name, merge(rounds), statistics.median(r.tokens / r.wall for r in rounds))
            if name in mean_batch:
                print(f"{'':<26} mean batch size {mean_batch[name]}")
        reference_rate = rates.pop("transformers, serial")
        for name, rate in rates.items():
            print(f"{name} / transformers serial: {rate / reference_rate:.2f}x tokens/s")
        for base in (f"ours fp32, batch {args.max_batch_size}", f"baseline fp32, batch {args.max_batch_size}"):
            for name, rate in rates.items():
                if base in rates and name.startswith("ours") and not name.endswith(", batch 1"):
                    print(f"{name} / {base}: {rate / rates[base]:.2f}x tokens/s")
        sys.exit(1 if any(r.failed for rounds in results.values() for r in rounds) else 0)


if __name__ == "__main__":
    main()
