"""Where a training step's time goes: torch.profiler over a few steps of ours, the top operators by self time.

    python bench/profile_train_step.py                          # GPT-2 124M, batch 1 x 1024, CPU, its precision
    python bench/profile_train_step.py --batch-size 16 --compile on   # on a GPU
    python bench/profile_train_step.py --drop-rate 0.1 --precision fp32

The step is bench/train_speed.py's (forward, backward, clipping, AdamW), after --warmup untimed steps.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from gpt2scratch.config import resolve_config
from gpt2scratch.models import GPT
from gpt2scratch.runtime import keep_freed_memory, pick_device, pick_precision
from train_speed import SDPA_FIRST, Variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", choices=("on", "off"), default="off")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--attention", choices=("auto", *SDPA_FIRST), default="auto", help="SDPA backend first")
    args = parser.parse_args()
    device, _ = pick_device(args.device)
    keep_freed_memory()  # as `gpt2scratch train` runs
    precision, _ = pick_precision(args.precision, device)
    config = replace(resolve_config(args.preset).model, drop_rate=args.drop_rate)
    torch.manual_seed(0)
    model = GPT(config, pad_vocab=64)
    variant = Variant(
        "ours",
        precision,
        args.drop_rate,
        model,
        device,
        "default" if args.compile == "on" else None,
        args.batch_size,
        args.attention,
    )
    for _ in range(args.warmup):
        variant.steps(1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = [variant.steps(1) for _ in range(args.steps)]
    print(
        f"{args.preset} batch {args.batch_size} x {config.context_length}, {precision}, dropout {args.drop_rate}, "
        f"compile {args.compile}, attention {args.attention}, {device}: "
        f"{1000 * sum(seconds) / len(seconds):.1f} ms/step"
    )
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
