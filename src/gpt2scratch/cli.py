"""The `gpt2scratch` command: parse arguments, build what they ask for, run it.

    gpt2scratch info [--preset NAME | --config FILE] [--json]
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"gpt2scratch {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gpt2scratch {args.command}: interrupted", file=sys.stderr)
        return 130
