"""Benchmark generation: ours (KV cache) against transformers' generate() on the same GPT-2 weights.

    python bench/generate_speed.py                 # GPT-2 124M shapes, random weights, CPU fp32
    python bench/generate_speed.py --preset tiny --rounds 5
    python bench/generate_speed.py --dtypes fp32 int8 int8+compile --batches 1
    python bench/generate_speed.py --device cuda --dtypes fp32 bf16 fp32+graphs bf16+graphs   # on a GPU

Ours decodes in each of --dtypes (fp32, bf16, int8, int8-dynamic: `generate --dtype`; D+compile: `generate --dtype D
--compile`, whose compilation runs before the timed rounds and is reported apart; D+graphs, on a GPU: the
one-token steps replayed from CUDA graphs, `generation.use_cuda_graphs`, captured within each timed run),
transformers in fp32 (the way a user runs it). Both sides decode greedily (so they do the same work, and in
fp32 their tokens are compared), from the same prompts, for --new-tokens tokens, at batch 1 and batch 8; runs are
interleaved (ours, theirs, ours, ...) --rounds times, after one untimed generation of each, and the medians
printed, with ours / theirs as a ratio of tokens per second. No download: the weights are a random init of the
preset's shape, loaded into every model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2scratch.config import resolve_config
from gpt2scratch.generation import compile_decoding, decoding_layout, generate_ids, use_cuda_graphs
from gpt2scratch.hf import hf_model_from_gpt
from gpt2scratch.models import GPT
from gpt2scratch.quantization import apply_dtype
from gpt2scratch.runtime import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    variants = [
        *(f"{dtype}{how}" for how in ("", "+compile") for dtype in ("fp32", "bf16", "int8", "int8-dynamic")),
        "fp32+graphs",
        "bf16+graphs",
    ]
    parser.add_argument(
        "--dtypes", nargs="+", default=["fp32", "bf16", "int8", "bf16+compile", "int8+compile"], choices=variants
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda where there is one)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    keep_freed_memory()  # as `gpt2scratch generate` runs
    torch.manual_seed(0)
    reference = GPT(resolve_config(args.preset).model).eval()
    theirs = hf_model_from_gpt(reference).to(device)
    ours = {}
    for variant in args.dtypes:  # as `gpt2scratch generate --dtype D [--compile]` opens a model
        dtype, _, compiled = variant.partition("+")
        model = GPT(reference.config).eval()
        model.load_state_dict(reference.state_dict())
        model.to(device)
        ours[variant] = decoding_layout(apply_dtype(model, dtype))
        if compiled == "compile":
            compile_decoding(model)
        elif compiled == "graphs":  # CUDA graphs for the one-token steps (a GPU only)
            use_cuda_graphs(model)
    vocab = reference.config.vocab_size
    # transformers has no rule for going past the context (position ids run out): stay within it
    args.new_tokens = min(args.new_tokens, reference.config.context_length - args.prompt_tokens)
    bandwidth = read_bandwidth(device)
    weight_bytes = 4 * reference.num_params()
    print(
        f"{args.preset}: {reference.num_params():,} parameters, {describe(device)}, "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; medians of {args.rounds} "
        f"interleaved rounds (torch {torch.__version__}). Read bandwidth {bandwidth / 1e9:.1f} GB/s: the fp32 "
        f"weights ({weight_bytes / 1e6:,.0f} MB) once per step allow at most {bandwidth / weight_bytes:.1f} "
        "steps/s (tokens/s at batch 1)"
    )
    header = "".join(f"{'ours ' + d:>{width(d)}}" for d in args.dtypes)
    ratios = "".join(f"{d + '/ref':>{width(d) + 3}}" for d in args.dtypes)
    print(f"{'batch':>5}{header} {'transformers fp32':>18}{ratios}  fp32 same tokens")
    for batch in args.batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_tokens), device=device)
        # One untimed generation of each, before the timed rounds, for what a model does once at a batch size:
        # compiling (or loading inductor's cache), and packing the fp32 weights for oneDNN (DecodingLinear, at its
        # first step of several rows: GPT-2 124M's first generation at batch 8 took 2.1 s against 1.3 s after, on
        # a 2-core EPYC, which a median of two rounds counted at half weight).
        for variant, model in ours.items():
            started = time.perf_counter()
            generate_ids(model, prompts.tolist(), 4, temperature=0)
            if "+compile" in variant:
                print(f"  {variant}, batch {batch}: compiled in {time.perf_counter() - started:.0f} s", flush=True)
        their_greedy(theirs, prompts, 4)
        times: dict[str, list[float]] = {name: [] for name in [*args.dtypes, "theirs"]}
        same = True
        ids: dict[str, list[list[int]]] = {}
        for _ in range(args.rounds):
            for dtype, model in ours.items():
                started = time.perf_counter()
                our_ids = generate_ids(model, prompts.tolist(), args.new_tokens, temperature=0)
                times[dtype].append(time.perf_counter() - started)
                ids[dtype] = our_ids
                if dtype == "fp32":
                    fp32_ids = our_ids
            started = time.perf_counter()
            out = their_greedy(theirs, prompts, args.new_tokens)
            synchronize(device)
            times["theirs"].append(time.perf_counter() - started)
            if "fp32" in ours:
                same &= out[:, args.prompt_tokens :].tolist() == fp32_ids
        tokens = batch * args.new_tokens
        rates = {name: tokens / statistics.median(values) for name, values in times.items()}
        cells = "".join(f"{rates[d]:>{width(d)}.1f}" for d in args.dtypes)
        ratio_cells = "".join(f"{rates[d] / rates['theirs']:>{width(d) + 2}.2f}x" for d in args.dtypes)
        print(f"{batch:>5}{cells} {rates['theirs']:>18.1f}{ratio_cells}  {same if 'fp32' in ours else '-'}")
        for (
            variant
        ) in ids:  # greedy tokens of a compiled or graphed step against the same dtype eager (near-ties may differ)
            eager = ids.get(variant.partition("+")[0]) if "+" in variant else None
            if eager is not None:
                pairs = [(a, b) for x, y in zip(ids[variant], eager, strict=True) for a, b in zip(x, y, strict=True)]
                agree = sum(a == b for a, b in pairs) / len(pairs)
                print(
                    f"  batch {batch}: {variant} greedy tokens equal to eager {variant.partition('+')[0]}'s: "
                    f"{agree:.1%}"
                )


def their_greedy(theirs, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy generate() of exactly `new_tokens` tokens after `prompts` (no end-of-text stop)."""
    with torch.no_grad():
        return theirs.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )


def width(variant: str) -> int:
    return max(11, len(variant) + 6)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s that a sum over a large fp32 tensor reads (best of `repeats`), with torch's threads."""
    data = torch.ones(megabytes * 2**20 // 4, device=device)
    data.sum()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


if __name__ == "__main__":
    main()
