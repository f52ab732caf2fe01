"""The generation engine behind the server: one thread that owns the model and runs a continuous batch.

Every completion a request asks for (prompts x n) is a *row*. Rows wait in a bounded FIFO queue; between two
decoding steps the engine admits waiting rows into the running batch (up to max_batch_size): their prompts are
processed together (left-padded), and their KV caches are joined to the batch's, right-aligned, with the
padding masked out. So requests that arrive together, or while others are generating, share every forward pass,
and a row that finishes (end of text, stop string, max_tokens, or a client gone) leaves the batch at once.

Each row samples with its own settings and its own random stream (seeded by the request's seed + the choice
index when given), so what a row generates does not depend on which rows share its batch.

The engine talks to the asyncio side by events: (choice, text, finish_reason) on the request's asyncio queue. A
step's events go over together, in one loop.call_soon_threadsafe (one wake-up of the event loop per step, not one
per token: the server's thread shares the CPU with the engine's); a row whose request is not streamed sends one
event, when it finishes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from gpt2scratch.generation import TextStream, decoding_step, left_pad, row_generator, row_uniforms, sample_rows
from gpt2scratch.models.gpt import GPT
from gpt2scratch.models.kv_cache import KVCache
from gpt2scratch.options import ServeOptions
from gpt2scratch.runtime import release_openmp_threads
from gpt2scratch.serve.protocol import CompletionRequest, TokenLogprob

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass
class Event:
    choice: int
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error" on a row's last event
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # the tokens since the last event (the prompt's first, with echo)


class Job:
    """One request as the engine sees it: its rows, and the asyncio queue its events go to."""

    def __init__(self, request: CompletionRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """The client is gone: its rows leave the queue / the batch at the engine's next step."""
        self.cancelled = True


def _put_all(events: list[tuple[Job, Event]]) -> None:
    """(On the event loop) each event on its request's queue."""
    for job, event in events:
        job.events.put_nowait(event)


def merged(first: Event | None, then: Event) -> Event:
    """Two events of one choice as one (the text and the tokens' logprobs of both; the later one's counts)."""
    if first is None:
        return then
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = [*(first.logprobs or []), *(then.logprobs or [])]
    return Event(then.choice, first.text + then.text, then.finish_reason, then.completion_tokens, logprobs)


@dataclass
class Row:
    job: Job
    choice: int
    prompt: list[int]
    stream: TextStream
    generator: torch.Generator
    generated: int = 0
    held: Event | None = None  # what a row of a request that is not streamed has generated so far


@dataclass
class Stats:
    requests: int = 0
    rows_finished: int = 0
    tokens_generated: int = 0
    steps: int = 0
    batch_rows_total: int = 0  # sum over steps of the batch size: / steps = mean batch size
    started: float = field(default_factory=time.time)


def logprob_entries(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """logits (N, V), each row predicting one of `tokens`: each token's log-probability and the k likeliest
    tokens', from one log-softmax (so that "was this token the likeliest" compares equal values)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    index = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
    chosen = logprobs.gather(-1, index).squeeze(-1).tolist()
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    tops = [
        dict(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return [TokenLogprob(token, value, top) for token, value, top in zip(tokens, chosen, tops, strict=True)]


def prompt_logprobs(prompt: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob]:
    """A prompt's own tokens scored by its logits (T, V): position t predicts token t + 1; nothing predicts the
    first token, whose entry is None (as in OpenAI's and vLLM's answers)."""
    return [TokenLogprob(prompt[0], None, None), *logprob_entries(logits[:-1], prompt[1:], k)]


def trim(entry: TokenLogprob, k: int) -> TokenLogprob:
    """The entry with its k likeliest alternatives only (a batch computes the most any row asked for)."""
    return TokenLogprob(entry.token, entry.logprob, dict(list(entry.top.items())[:k]))


class Engine:
    def __init__(
        self,
        model: GPT,
        tokenizer,
        max_batch_size: int = ServeOptions.max_batch_size,
        max_queue: int = ServeOptions.max_queue,
        seed: int | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_queue ({max_queue}) must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.lm_head.weight.device
        self.context = model.config.context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = Stats()
        self._seeds = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns()))
        self._pending: deque[Row] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # set if the engine thread died
        # the running batch
        self._rows: list[Row] = []
        self._caches: list[KVCache] = []
        self._pad: torch.Tensor | None = None  # (B,) left padding of each row
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of each row
        self._outbox: list[tuple[Job, Event]] = []  # events to hand to the asyncio side (_deliver)

    # ---- called from the server (any thread) ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self.device.type == "cpu":  # the engine's thread gets the cores' OpenMP workers to itself (runtime.py)
            release_openmp_threads()
        self._thread = threading.Thread(target=self._run, name="gpt2scratch-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a request's rows, or raise QueueFull / EngineStopped (nothing is queued then)."""
        request = job.request
        rows = []
        for p, prompt in enumerate(request.prompts):
            for j in range(request.n):
                choice = p * request.n + j
                if request.seed is not None:
                    generator = row_generator(request.seed, choice)
                else:
                    generator = row_generator(int(torch.randint(2**62, (1,), generator=self._seeds)), 0)
                rows.append(Row(job, choice, prompt, TextStream(self.tokenizer, request.stop), generator))
        with self._cond:
            if not self.alive:
                raise EngineStopped("the generation engine is not running")
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} completions are waiting and this request adds {len(rows)}: over the "
                    f"queue limit of {self.max_queue} (--max-queue)"
                )
            self._pending.extend(rows)
            self.stats.requests += 1
            self._cond.notify()

    # ---- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stopping and not self._pending and not self._rows:
                            self._cond.wait()
                        if self._stopping:
                            break
                    self._admit()
                    try:
                        if self._rows:
                            self._step()
                    except Exception as error:  # the model itself failed: the batch's rows fail, not the server
                        self._fail(self._rows, error)
                        self._reset()
                    self._deliver()
        except BaseException as error:  # pragma: no cover - the thread itself died
            self.error = error
            log.exception("the generation engine stopped")
        finally:
            self._stopping = True
            for row in [*self._rows, *self._pending]:
                self._send(row, Event(row.choice, "the server is shutting down", "error", row.generated))
            self._deliver()

    def _send(self, row: Row, event: Event) -> None:
        self._outbox.append((row.job, event))

    def _deliver(self) -> None:
        """Hand the events sent since the last call to the asyncio side: one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                for job, _ in events:
                    job.cancelled = True

    def _fail(self, rows: list[Row], error: Exception) -> None:
        log.exception(f"generation failed for {len(rows)} completion(s); they get an error")
        for row in rows:
            self._send(row, Event(row.choice, f"generation failed: {error}", "error", row.generated))

    def _reset(self) -> None:
        self._rows, self._caches, self._pad, self._logits = [], [], None, None

    def _admit(self) -> None:
        """Move waiting rows into the batch: one forward pass over their prompts, then join the caches."""
        new: list[Row] = []
        with self._cond:
            if any(row.job.cancelled for row in self._pending):  # clients gone while waiting: free their places
                self._pending = deque(row for row in self._pending if not row.job.cancelled)
            while self._pending and len(self._rows) + len(new) < self.max_batch_size:
                new.append(self._pending.popleft())
        if not new:
            return
        # A prompt to be scored (echo + logprobs) is processed alone, unpadded: its log-probabilities are then
        # exactly those it gets when it is the only request. The others are processed together.
        scored = [row for row in new if row.job.request.scores_prompt]
        rest = [row for row in new if not row.job.request.scores_prompt]
        groups = [[row] for row in scored] + ([rest] if rest else [])
        for group in groups:
            try:
                self._prefill(group)
            except Exception as error:  # these rows fail; the running batch is untouched (caches are joined last)
                self._fail(group, error)

    def _prefill(self, new: list[Row]) -> None:
        ids, pad = left_pad([row.prompt for row in new], self.context, self.device)
        pad = pad if pad is not None else torch.zeros(len(new), dtype=torch.long, device=self.device)
        caches = self.model.new_kv_caches()
        scored = new[0].job.request.scores_prompt  # a group of one (see _admit)
        # Prompts go through the compiled pass (--compile), except prompts of one token (a graph of their own,
        # not compiled at warm-up: compiling it would stall the server) and prompts to be scored (their
        # log-probabilities are the eager model's, as `eval` computes them).
        forward = self.model if scored or ids.size(1) == 1 else decoding_step(self.model)
        logits, _ = forward(ids, caches=caches, pad_lengths=pad if bool(pad.any()) else None, last_only=not scored)
        if scored:
            row = new[0]
            entries = prompt_logprobs(row.prompt, logits[0], row.job.request.logprobs)
            self._send(row, Event(row.choice, logprobs=entries))
            if row.job.request.max_tokens == 0:  # scoring only
                self._send(row, Event(row.choice, "", "length", 0))
                self.stats.rows_finished += 1
                return
        if not self._rows:
            self._rows, self._caches, self._pad, self._logits = new, caches, pad, logits[:, -1, :]
            return
        old_length, new_length = self._caches[0].length, caches[0].length
        joined = [KVCache.join(old, fresh) for old, fresh in zip(self._caches, caches, strict=True)]
        pad = torch.cat([self._pad + max(new_length - old_length, 0), pad + max(old_length - new_length, 0)])
        logits = torch.cat([self._logits, logits[:, -1, :]])
        self._rows, self._caches, self._pad, self._logits = self._rows + new, joined, pad, logits

    def _sample(self, rows: list[Row], logits: torch.Tensor, uniform: torch.Tensor) -> list[int]:
        settings = [row.job.request for row in rows]
        temperature = torch.tensor([r.temperature for r in settings], device=self.device)
        top_k = torch.tensor([r.top_k for r in settings], device=self.device)
        top_p = torch.tensor([r.top_p for r in settings], device=self.device)
        return sample_rows(logits, temperature, top_k, top_p, uniform).tolist()

    def _token_logprobs(self, rows: list[Row], tokens: list[int | None]) -> dict[int, list[TokenLogprob]]:
        """For the rows whose request asks for logprobs: the sampled token's entry, from the logits sampled from."""
        wanted = [i for i, row in enumerate(rows) if row.job.request.logprobs is not None and tokens[i] is not None]
        if not wanted:
            return {}
        k = max(rows[i].job.request.logprobs for i in wanted)
        index = torch.tensor(wanted, device=self.device)
        entries = logprob_entries(self._logits.index_select(0, index), [tokens[i] for i in wanted], k)
        return {i: [trim(entry, rows[i].job.request.logprobs)] for i, entry in zip(wanted, entries, strict=True)}

    def _step(self) -> None:
        """Sample one token for every row, send the text, drop finished rows, run the next forward pass."""
        rows = self._rows
        uniform = row_uniforms([row.generator for row in rows], self.device)
        try:
            tokens = self._sample(rows, self._logits, uniform)
        except Exception:  # find the rows whose settings fail: they fail alone
            tokens = []
            for i, row in enumerate(rows):
                try:
                    tokens += self._sample([row], self._logits[i : i + 1], uniform[i : i + 1])
                except Exception as error:
                    self._fail([row], error)
                    row.job.cancel()  # dropped below, with the rows of clients gone
                    tokens.append(None)
        self.stats.steps += 1
        self.stats.batch_rows_total += len(rows)

        keep, next_ids = [], []
        eot = self.tokenizer.eot_id
        scored = self._token_logprobs(rows, tokens)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.job.cancelled:
                continue
            row.generated += 1
            self.stats.tokens_generated += 1
            finish = None
            if token == eot:
                text, finish = row.stream.finish(), "stop"
            else:
                text = row.stream.push(token)
                if row.stream.stopped:
                    finish = "stop"
                elif row.generated >= row.job.request.max_tokens:
                    text, finish = text + row.stream.finish(), "length"
            event = Event(row.choice, text, finish, row.generated, scored.get(i))
            if finish is None and not row.job.request.stream:  # a whole answer: nothing goes out before the end
                row.held = merged(row.held, event)
            elif text or finish or i in scored:  # (a token's logprobs go out even while its text is held back)
                self._send(row, merged(row.held, event))
                row.held = None
            if finish is None:
                keep.append(i)
                next_ids.append(token)
            else:
                self.stats.rows_finished += 1
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):
            token_of = dict(zip(keep, next_ids, strict=True))
            keep = KVCache.fill_order(keep)  # (rows from the end take the places of those that left: least copied)
            next_ids = [token_of[i] for i in keep]
            index = torch.tensor(keep, device=self.device)
            for cache in self._caches:
                cache.keep_rows(index)
            self._rows = [rows[i] for i in keep]
            self._pad = self._pad.index_select(0, index)
        length = self._caches[0].length
        # Padding that every row has: drop it when the cache is full, or mostly pad, or when one row is left (whose
        # steps then need no mask: the fast attention path, and one compiled graph less with --compile).
        unused = int(self._pad.min())
        if unused and (length >= self.context or unused * 2 >= length or len(self._rows) == 1):
            for cache in self._caches:
                cache.drop_front(unused)
            self._pad = self._pad - unused
        idx = torch.tensor(next_ids, device=self.device)[:, None]
        pad = self._pad if bool(self._pad.any()) else None
        logits, _ = decoding_step(self.model)(idx, caches=self._caches, pad_lengths=pad, last_only=True)
        self._logits = logits[:, -1, :]
