"""OpenAI's completions protocol: parse and check a request body, build answers, chunks and errors.

Checked by hand rather than by a schema library so that every error names its field the way OpenAI's API does:
400 with {"error": {"message", "type": "invalid_request_error", "param": FIELD, "code"}}. Fields OpenAI knows
but this server does not implement are accepted at their neutral value (presence_penalty 0, logprobs null, ...)
and refused otherwise; a field OpenAI does not know is refused ("Unrecognized request argument supplied").
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from gpt2scratch.config import Sampling

MAX_N = 16  # completions per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGPROBS = 5  # alternatives per token in `logprobs`, as OpenAI's legacy completions
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

NEUTRAL = {  # known to OpenAI, not implemented here: accepted only at these values
    "best_of": None,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "suffix": None,
}
KNOWN = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "echo",
    "logprobs",
    "user",
    *NEUTRAL,
}


class APIError(Exception):
    """An error answer: HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", code=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]  # for echo
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    echo: bool
    model: str
    logprobs: int | None = None  # None: no log-probabilities; N: each token's, and the N likeliest alternatives

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's own tokens get log-probabilities too (what evaluators ask for)."""
        return self.echo and self.logprobs is not None

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Limits:
    """What the served model allows, and its sampling defaults."""

    model: str
    context_length: int
    vocab_size: int
    max_token_chars: int = 64  # the longest token's text: a prompt longer than context x this cannot fit
    sampling: Sampling = Sampling()  # the model's defaults, for what a request leaves out
    extra: dict = field(default_factory=dict)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # ValueError: JSON, or a 5,000-digit int
        if isinstance(error, RecursionError):
            error = "nested too deeply"
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({error}). The body must be one JSON object; "
            "send it with the header 'Content-Type: application/json'.",
        ) from None


def _int(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{value!r} is not of type 'integer' - '{name}'", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{value} is {_bounds(low, high)} - '{name}'", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(400, f"{value!r} is not of type 'number' - '{name}'", name)
    if not low <= value <= high:
        raise APIError(400, f"{value} is {_bounds(low, high)} - '{name}'", name)
    return float(value)


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"not in [{low}, {high}]"
    return f"less than the minimum of {low}" if low is not None else f"greater than the maximum of {high}"


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{value!r} is not of type 'boolean' - '{name}'", name)
    return value


def _prompts(value, tokenizer, limits: Limits) -> tuple[list[list[int]], list[str]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if value is None:
        raise APIError(400, "you must provide a prompt: a string or a list of strings", "prompt")
    if isinstance(value, str) or (isinstance(value, list) and value and all(is_token_id(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise APIError(400, f"{short(value)} is not a string or a non-empty list of strings - 'prompt'", "prompt")
    if len(value) > MAX_PROMPTS:
        raise APIError(400, f"{len(value)} prompts is more than the maximum of {MAX_PROMPTS} - 'prompt'", "prompt")
    prompts, texts = [], []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if len(item) > limits.context_length * limits.max_token_chars:  # refused before encoding it all
                raise _too_long(limits, i, len(value), f"at least {len(item) // limits.max_token_chars}")
            ids = tokenizer.encode(item) if item else [tokenizer.eot_id]  # "" starts from <|endoftext|>
            text = item
        elif isinstance(item, list) and item and all(is_token_id(t) for t in item):
            if len(item) > limits.context_length:
                raise _too_long(limits, i, len(value), str(len(item)))
            if max(item) >= limits.vocab_size:
                raise APIError(400, f"prompt[{i}] holds token id {max(item)}, not below {limits.vocab_size}", "prompt")
            ids, text = item, tokenizer.decode(item)
        else:
            raise APIError(400, f"prompt[{i}] ({short(item)}) is not a string or a list of token ids", "prompt")
        if len(ids) > limits.context_length:
            raise _too_long(limits, i, len(value), str(len(ids)))
        prompts.append(ids)
        texts.append(text)
    return prompts, texts


def _too_long(limits: Limits, index: int, count: int, tokens: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {limits.context_length} tokens, however your prompt"
        f"{'' if count == 1 else f'[{index}]'} is {tokens} tokens. Please shorten the prompt.",
        "prompt",
        code="context_length_exceeded",
    )


def is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_completion(body: Any, tokenizer, limits: Limits) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name in body:
        if name not in KNOWN:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name)
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is None or value == neutral:
            continue
        if (name == "logit_bias" and value == {}) or (name == "best_of" and value == body.get("n", 1)):
            continue
        raise APIError(400, f"'{name}' is not supported by this server; leave it out (or at {neutral!r})", name)

    model = body.get("model", limits.model)
    if not isinstance(model, str):
        raise APIError(400, f"{model!r} is not of type 'string' - 'model'", "model")
    if model != limits.model:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{limits.model}' (see GET /v1/models)",
            "model",
            code="model_not_found",
        )
    prompts, texts = _prompts(body.get("prompt"), tokenizer, limits)
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, low=0)
    longest = max(map(len, prompts))
    if longest + max_tokens > limits.context_length:
        raise APIError(
            400,
            f"This model's maximum context length is {limits.context_length} tokens, however you requested "
            f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the completion). "
            f"Please reduce your prompt or max_tokens (at most {limits.context_length - longest} here).",
            "max_tokens",
            code="context_length_exceeded",
        )
    temperature = _number(body, "temperature", limits.sampling.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", limits.sampling.top_k, low=-1, high=limits.vocab_size)
    n = _int(body, "n", 1, low=1, high=MAX_N)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"{short(stop)} is not a string or a list of strings - 'stop'", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"{len(stop)} stop strings is more than the maximum of {MAX_STOP} - 'stop'", "stop")
    seed = _int(body, "seed", None, low=-(2**63), high=2**63 - 1)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise APIError(400, "stream_options is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "stream_options must be an object with only 'include_usage'", "stream_options")
        include_usage = _bool(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, f"{user!r} is not of type 'string' - 'user'", "user")
    return CompletionRequest(
        prompts=prompts,
        prompt_texts=texts,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both switch top-k off
        n=n,
        stop=tuple(s for s in stop if s),
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        echo=_bool(body, "echo"),
        logprobs=_int(body, "logprobs", None, low=0, high=MAX_LOGPROBS),
        model=model,
    )


def new_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def completion(
    request_id: str, created: int, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


@dataclass
class TokenLogprob:
    """One token of a completion (or of its prompt, with echo): its id, its log-probability (None for the first
    prompt token, which nothing predicts) and the likeliest alternatives, {id: log-probability}."""

    token: int
    logprob: float | None
    top: dict[int, float] | None


class Logprobs:
    """A choice's `logprobs` object as OpenAI's legacy completions give it: tokens, token_logprobs, top_logprobs
    and text_offset (each token's character offset in prompt + completion)."""

    def __init__(self, tokenizer, offset: int):
        self.tokenizer, self.offset = tokenizer, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict | None] = []
        self.text_offset: list[int] = []

    def add(self, entries: list[TokenLogprob]) -> dict:
        """Append these tokens; returns the object for them alone (a stream chunk's)."""
        part = Logprobs(self.tokenizer, self.offset)
        for entry in entries:
            part._append(entry)
        self.tokens += part.tokens
        self.token_logprobs += part.token_logprobs
        self.top_logprobs += part.top_logprobs
        self.text_offset += part.text_offset
        self.offset = part.offset
        return part.body()

    def _append(self, entry: TokenLogprob) -> None:
        text = self.tokenizer.decode([entry.token])
        self.tokens.append(text)
        self.token_logprobs.append(entry.logprob)
        top = None if entry.top is None else {self.tokenizer.decode([t]): value for t, value in entry.top.items()}
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def body(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(request_id: str, created: int, model: str, choices: list[dict], usage_counts: dict | None = None) -> str:
    """One server-sent event in OpenAI's stream format."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
