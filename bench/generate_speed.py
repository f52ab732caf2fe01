"""Benchmark generation: ours (KV cache) against transformers' generate() on the same GPT-2 weights.

    python bench/generate_speed.py                 # GPT-2 124M shapes, random weights, CPU fp32
    python bench/generate_speed.py --preset tiny --rounds 5

Both sides decode greedily (so they do the same work, and their tokens are compared), from the same prompts,
for --new-tokens tokens, at batch 1 and batch 8; runs are interleaved (ours, theirs, ours, ...) --rounds times
and the medians printed, with ours / theirs as a ratio of tokens per second. No download: the weights are a
random init of the preset's shape, loaded into both models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2scratch.config import resolve_config
from gpt2scratch.generation import decoding_layout, generate_ids
from gpt2scratch.hf import hf_model_from_gpt
from gpt2scratch.models import GPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = GPT(resolve_config(args.preset).model).eval()
    theirs = hf_model_from_gpt(ours)
    decoding_layout(ours)  # as `gpt2scratch generate` and `serve` do
    vocab = ours.config.vocab_size
    # transformers has no rule for going past the context (position ids run out): stay within it
    args.new_tokens = min(args.new_tokens, ours.config.context_length - args.prompt_tokens)
    print(
        f"{args.preset}: {ours.num_params():,} parameters, CPU fp32, {torch.get_num_threads()} threads, "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; medians of {args.rounds} "
        f"interleaved rounds (torch {torch.__version__})"
    )
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>7}  same tokens")
    for batch in args.batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_tokens))
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        same = True
        for _ in range(args.rounds):
            started = time.perf_counter()
            our_ids = generate_ids(ours, prompts.tolist(), args.new_tokens, temperature=0)
            times["ours"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                out = theirs.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            times["theirs"].append(time.perf_counter() - started)
            same &= out[:, args.prompt_tokens :].tolist() == our_ids
        tokens = batch * args.new_tokens
        ours_rate = tokens / statistics.median(times["ours"])
        theirs_rate = tokens / statistics.median(times["theirs"])
        print(f"{batch:>5} {ours_rate:>11.1f} {theirs_rate:>19.1f} {ours_rate / theirs_rate:>6.2f}x  {same}")


if __name__ == "__main__":
    main()
