"""The `gpt2scratch` command: parse arguments, build what they ask for, run it.

    gpt2scratch info [--preset NAME | --config FILE] [--json]
    gpt2scratch prepare [INPUT ...] --out DIR [--tokenizer gpt2 | bpe:N]
    gpt2scratch --help

Nothing imports this module. Library code raises exceptions; here they become one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from gpt2scratch import __version__
from gpt2scratch.config import PRESETS, SECTIONS, Config, resolve_config

log = logging.getLogger("gpt2scratch")


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------------
# Config flags: one --flag per dataclass field, generated so that --help always lists every setting.


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "configuration", "defaults < --preset < --config file < these flags; see the README for every default"
    )
    group.add_argument("--preset", choices=list(PRESETS), help="a named model shape (default: the seed's GPTConfig)")
    group.add_argument("--config", metavar="FILE", help="a JSON or TOML file with [model] and [training] sections")
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{f.metadata.get('help', '')} [{section}.{f.name}, default {f.default}]"
            if f.type == "bool":
                group.add_argument(
                    flag, dest=f"{section}.{f.name}", action=argparse.BooleanOptionalAction, help=help_text
                )
            else:
                kind = {"int": int, "float": float, "str": str}[f.type]
                group.add_argument(flag, dest=f"{section}.{f.name}", type=kind, metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    return resolve_config(args.preset, args.config, overrides)


# ----------------------------------------------------------------------------------------------------------------------
# info


def cmd_info(args: argparse.Namespace) -> int:
    from gpt2scratch.estimates import flops_per_token, n_params, n_params_non_embedding, training_memory_bytes

    config = config_from_args(args)
    memory = training_memory_bytes(config.model, config.training.batch_size, args.precision)
    report = {
        "config": config.to_dict(),
        "n_params": n_params(config.model),
        "n_params_non_embedding": n_params_non_embedding(config.model),
        "flops_per_token": flops_per_token(config.model),
        "training_memory": {
            "micro_batch": config.training.batch_size,
            "precision": args.precision,
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
        f"training memory (micro-batch {config.training.batch_size} x {config.model.context_length}, {args.precision}, "
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
        "training FLOPs per token, and an estimate of training memory for --batch-size sequences per micro-batch. "
        "With no --preset or --config it describes the seed's default GPTConfig().",
    )
    add_config_arguments(info)
    info.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="for the memory estimate")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (UserError, ValueError, OSError) as error:
        print(f"gpt2scratch {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gpt2scratch {args.command}: interrupted", file=sys.stderr)
        return 130
