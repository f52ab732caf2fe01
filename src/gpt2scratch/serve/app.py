"""The HTTP side: a FastAPI app with OpenAI's /v1/completions (JSON or server-sent events), /v1/models, /health,
and a web page at / to try the model.

    POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, n, stop, seed, stream, echo, ...
    GET  /v1/models        the served model
    GET  /health           status, queue and counters (no API key needed)
    GET  /                 the web page (self-contained: nothing is fetched from elsewhere)

Every error is a JSON object in OpenAI's format with a 4xx/5xx status: 400 for a bad request (naming the
field), 401 for a missing/wrong API key, 404 for an unknown model or path, 429 when the queue is full (retry
later), 503 when the engine is not running.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2scratch.serve import protocol
from gpt2scratch.serve.engine import Engine, EngineStopped, Event, Job, QueueFull
from gpt2scratch.serve.protocol import APIError, Limits

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this is refused (413) before it is parsed
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there


def create_app(engine: Engine, limits: Limits, api_key: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="gpt2scratch", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model_id = limits.model
    app.state.engine = engine
    page = _page(limits, api_key is not None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"Unknown path {request.url.path}; the API is under /v1 (see GET /v1/models)"}.get(
            error.status_code, str(error.detail)
        )
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)

    def parse(raw: bytes) -> protocol.CompletionRequest:
        return protocol.parse_completion(protocol.parse_json(raw), engine.tokenizer, limits)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):  # a bug: still an answer in OpenAI's format
        log.error(f"{request.method} {request.url.path} failed: {type(error).__name__}: {error}")
        body = APIError(500, f"internal error ({type(error).__name__}); this is a bug", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with the key the "
                "server was started with (--api-key)",
                code="invalid_api_key",
            )

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats
        body = {
            "status": "ok" if engine.alive else "stopped",
            "model": limits.model,
            "waiting": engine.waiting,
            "running": engine.running,
            "max_queue": engine.max_queue,
            "max_batch_size": engine.max_batch_size,
            "requests": stats.requests,
            "completions": stats.rows_finished,
            "tokens_generated": stats.tokens_generated,
            "mean_batch_size": round(stats.batch_rows_total / stats.steps, 2) if stats.steps else 0.0,
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    def model_card() -> dict:
        return {
            "id": limits.model,
            "object": "model",
            "created": int(engine.stats.started),
            "owned_by": "gpt2scratch",
            "context_length": limits.context_length,
            **limits.extra,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        authorize(request)
        if model_id != limits.model:
            raise APIError(404, f"The model '{model_id}' does not exist", "model", code="model_not_found")
        return model_card()

    # Tokenizer endpoints at the root, as vLLM has them (lm-evaluation-harness's tokenizer_backend=remote uses them)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        authorize(request)
        eot = engine.tokenizer.decode([engine.tokenizer.eot_id])
        return {
            "tokenizer_class": "GPT2Tokenizer",
            "eos_token": eot,
            "bos_token": eot,
            "unk_token": eot,
            "pad_token": None,
            "add_bos_token": False,
            "add_prefix_space": False,
            "model_max_length": limits.context_length,
            "vocab_size": limits.vocab_size,
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        authorize(request)
        body = await run_in_threadpool(protocol.parse_json, await _read_body(request))
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise APIError(400, f"{protocol.short(prompt)} is not of type 'string' - 'prompt'", "prompt")
        if not isinstance(body.get("add_special_tokens", False), bool):  # GPT-2 adds none either way
            raise APIError(400, "'add_special_tokens' must be true or false", "add_special_tokens")
        tokens = await run_in_threadpool(engine.tokenizer.encode, prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": limits.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        authorize(request)
        body = await run_in_threadpool(protocol.parse_json, await _read_body(request))
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(protocol.is_token_id(t) and t < limits.vocab_size for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids below {limits.vocab_size}", "tokens")
        return {"prompt": await run_in_threadpool(engine.tokenizer.decode, tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        raw = await _read_body(request)
        # Parsing and tokenizing take CPU time: off the event loop, so that other requests are not held up.
        completion = await run_in_threadpool(parse, raw)
        if completion.n_choices > engine.max_queue:
            raise APIError(
                400,
                f"this request asks for {completion.n_choices} completions (prompts x n); the server queues at most "
                f"{engine.max_queue} (--max-queue): lower n or send fewer prompts at once",
                "n",
            )
        job = Job(completion, asyncio.get_running_loop())
        if completion.max_tokens > 0 or completion.scores_prompt:
            try:
                engine.submit(job)
            except QueueFull as error:
                raise APIError(429, f"The server is busy: {error}. Retry shortly.", type="server_busy") from None
            except EngineStopped as error:
                raise APIError(503, f"Service unavailable: {error}", type="server_error") from None
        answer = _Answer(job, protocol.new_id(), protocol.now(), limits.model, engine.tokenizer)
        if completion.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(answer.stream(), media_type="text/event-stream", headers=headers)
        whole = await answer.whole(request)
        return JSONResponse(whole) if whole is not None else Response(status_code=499)  # nobody is listening

    return app


async def _read_body(request: Request) -> bytes:
    """The body, read no further than MAX_BODY_BYTES (a declared Content-Length or a chunked body alike)."""
    too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class _Answer:
    """Collects one request's engine events into OpenAI's answer (whole, or as a stream of chunks)."""

    def __init__(self, job: Job, request_id: str, created: int, model: str, tokenizer):
        self.job, self.id, self.created, self.model = job, request_id, created, model
        request = job.request
        self.prompt_tokens = sum(map(len, request.prompts))  # once per prompt, whatever n is (as OpenAI)
        self.prefix = [request.prompt_texts[c // request.n] if request.echo else "" for c in range(request.n_choices)]
        self.completion_tokens = [0] * request.n_choices
        # text offsets count from the start of the prompt, whether it is echoed or not
        self.logprobs = None
        if request.logprobs is not None:
            starts = [
                0 if request.echo else len(request.prompt_texts[c // request.n]) for c in range(request.n_choices)
            ]
            self.logprobs = [protocol.Logprobs(tokenizer, start) for start in starts]

    def _logprobs_of(self, event: Event) -> dict | None:
        """The event's tokens added to its choice's logprobs; returns them alone (for a stream chunk)."""
        if self.logprobs is None or event.logprobs is None:
            return None
        return self.logprobs[event.choice].add(event.logprobs)

    async def events(self):
        """Each choice's events until all have finished (max_tokens 0: each finishes at once)."""
        request = self.job.request
        if request.max_tokens == 0 and not request.scores_prompt:
            for c in range(request.n_choices):
                yield Event(c, "", "length", 0)
            return
        left = request.n_choices
        while left:
            event = await self.job.events.get()
            if event.finish_reason == "disconnected":
                return
            if event.finish_reason == "error":
                raise APIError(500, event.text, type="server_error")
            if event.finish_reason is not None:
                left -= 1
                self.completion_tokens[event.choice] = event.completion_tokens
            yield event

    async def whole(self, http_request: Request) -> dict | None:
        """The whole answer, or None if the client went away first (its rows are cancelled then)."""
        gone = asyncio.Event()

        async def watch() -> None:  # is the client still there? (for a stream, Starlette itself listens)
            while not await http_request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            gone.set()
            self.job.cancel()
            self.job.events.put_nowait(Event(-1, "", "disconnected"))

        texts = list(self.prefix)
        finish: list[str | None] = [None] * len(texts)
        watcher = asyncio.create_task(watch())
        try:
            async for event in self.events():
                texts[event.choice] += event.text
                self._logprobs_of(event)
                if event.finish_reason:
                    finish[event.choice] = event.finish_reason
        finally:
            watcher.cancel()
            self.job.cancel()  # no-op once every row has finished
        if gone.is_set():
            return None
        logprobs = [None] * len(texts) if self.logprobs is None else [part.body() for part in self.logprobs]
        choices = [protocol.choice(i, text, finish[i], logprobs[i]) for i, text in enumerate(texts)]
        return protocol.completion(
            self.id, self.created, self.model, choices, self.prompt_tokens, sum(self.completion_tokens)
        )

    async def stream(self):
        try:
            for i, text in enumerate(self.prefix):
                if text:
                    yield protocol.chunk(self.id, self.created, self.model, [protocol.choice(i, text, None)])
            try:
                async for event in self.events():
                    piece = protocol.choice(event.choice, event.text, event.finish_reason, self._logprobs_of(event))
                    yield protocol.chunk(self.id, self.created, self.model, [piece])
            except APIError as error:  # the status line is sent already: the error goes in the stream
                yield f"data: {json.dumps(error.body())}\n\n"
            else:
                if self.job.request.include_usage:
                    counts = protocol.usage(self.prompt_tokens, sum(self.completion_tokens))
                    yield protocol.chunk(self.id, self.created, self.model, [], counts)
            yield protocol.DONE
        finally:  # also when the client disconnects: the rows leave the batch at the next step
            self.job.cancel()


def _page(limits: Limits, needs_key: bool) -> str:
    html = resources.files("gpt2scratch.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    settings = {
        "model": limits.model,
        "context_length": limits.context_length,
        "top_k": limits.sampling.top_k,
        "temperature": limits.sampling.temperature,
        "needs_key": needs_key,
    }
    return html.replace("/*SETTINGS*/{}", json.dumps(settings).replace("</", "<\\/"))
