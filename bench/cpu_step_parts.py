"""Where a bf16 training step goes on a CPU: its parts timed alone, beside the whole step, ours and transformers'.

    python bench/cpu_step_parts.py                   # GPT-2 124M, batch 1 x 1024, bf16 autocast
    python bench/cpu_step_parts.py --preset cpu --rounds 3

The step is bench/train_speed.py's (forward, loss, backward, clipping, fused AdamW, as `gpt2scratch train` takes
it). Each part is the step's own code on inputs of the step's shapes, forward and backward where it has one,
times the number of such calls in a step: a whole block (x 12 for GPT-2), and inside it its matrix products (as
cpu_matmul plans them for training), the attention kernel, GELU, the two LayerNorms and autocast's casts of its
weights and their gradients; then the LM head with the loss (of which its three products), the AdamW update and
the gradient norm. "rest" is what the step takes beyond its listed parts. Every round times the steps and every
part in turn (each part the median of --repeats calls), after --warmup steps that make the matmul and attention
plans; the table shows medians over --rounds rounds.

Below the table: what issue 14's CPU goals ask of the step (1.5x transformers' step; 40% of the bf16 matmul rate
measured in the same rounds), beside what the products and the attention kernel alone take at this machine's
speed. Time the parts here, not from torch.profiler, which inflates vocabulary-sized operations on a CPU
(bench/profile_train_step.py ranks operators).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from gpt2scratch.config import TrainingConfig, resolve_config
from gpt2scratch.estimates import flops_per_token
from gpt2scratch.hf import hf_model_from_gpt
from gpt2scratch.models import GPT, cpu_matmul
from gpt2scratch.models.linear import Linear
from gpt2scratch.models.linear_cross_entropy import linear_cross_entropy
from gpt2scratch.runtime import keep_freed_memory
from gpt2scratch.trainer import configure_optimizer
from train_speed import Variant, ceiling_product_shapes, matmul_ceiling

BF16 = torch.bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape (default: GPT-2 124M)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each part per round (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (they make the plans)")
    parser.add_argument("--no-reference", action="store_true", help="ours only (no transformers step)")
    args = parser.parse_args()

    keep_freed_memory()  # as `gpt2scratch train` runs
    config = replace(resolve_config(args.preset).model, drop_rate=0.0)
    B, T = args.batch_size, config.context_length
    device = torch.device("cpu")
    torch.manual_seed(0)
    ours = Variant("ours", "bf16", 0.0, GPT(config, pad_vocab=64), device, None, B)
    steps = {"ours": ours}
    if not args.no_reference:
        steps["transformers"] = Variant(
            "transformers", "bf16", 0.0, hf_model_from_gpt(GPT(config)).train(), device, None, B
        )
    for variant in steps.values():
        variant.steps(args.warmup)

    parts, product_flops = step_parts(GPT(config, pad_vocab=64), B, T)
    print(
        f"{args.preset}, batch {B} x {T}, bf16 autocast, dropout 0, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; medians of {args.rounds} interleaved rounds"
    )
    part_times: dict[str, list[float]] = {name: [] for name in parts}
    for run, _ in parts.values():  # first calls: allocations, the library's kernels for each shape
        run()
    rates, ceiling_shapes = [], ceiling_product_shapes(config, B)
    for _ in range(args.rounds):
        rates.append(matmul_ceiling(device, "bf16", ceiling_shapes))
        for variant in steps.values():
            variant.seconds.append(variant.steps(args.steps))
        for name, (run, count) in parts.items():
            part_times[name].append(count * _median_seconds(run, args.repeats))

    step = statistics.median(ours.seconds)
    ms = {name: 1000 * statistics.median(times) for name, times in part_times.items()}
    top_level = ["blocks", "LM head + loss", "AdamW update", "gradient norm"]
    ms["rest of the step"] = 1000 * step - sum(ms[name] for name in top_level)
    ms["rest of a block"] = ms["blocks"] - sum(ms[name] for name in BLOCK_PARTS)
    print(f"\n{'part':<44} {'ms/step':>9} {'share':>7}")
    print(f"{'the whole step (ours)':<44} {1000 * step:>9.1f} {'100%':>7}")
    for name in [
        "blocks",
        *BLOCK_PARTS,
        "rest of a block",
        "LM head + loss",
        "LM head products",
        "AdamW update",
        "gradient norm",
        "rest of the step",
    ]:
        indent = "  " if name in (*BLOCK_PARTS, "rest of a block", "LM head products") else ""
        label = f"{indent}{name}{'' if name not in parts else f' (x {parts[name][1]})'}"
        print(f"{label:<44} {ms[name]:>9.1f} {ms[name] / (10 * step):>6.1f}%")

    rate = statistics.median(rates)
    products = ms["block products"] + ms["LM head products"]
    kernels = products + ms["attention"]
    print(
        f"\nmatrix products alone: {products:.0f} ms, {product_flops / products / 1e6:,.0f} GFLOP/s; "
        f"bf16 matmul rate (the fastest of 2048^3 and the step's products in their layouts, median of the rounds): "
        f"{rate / 1e9:,.0f} GFLOP/s"
    )
    floor = f"\n  the products and the attention kernel alone take {kernels:.0f} ms"
    if "transformers" in steps:
        theirs = 1000 * statistics.median(steps["transformers"].seconds)
        print(
            f"1.5x transformers ({theirs:.0f} ms a step, ours {theirs / (1000 * step):.2f}x): ours at most "
            f"{theirs / 1.5:.0f} ms a step;{floor}"
        )
    flops = flops_per_token(config) * B * T
    print(
        f"40% of the matmul rate ({flops / 1e9:,.0f} GFLOP a step): at most {flops / (0.4 * rate) * 1000:.0f} ms "
        f"a step (ours: {flops / step / rate:.1%} of the rate);{floor}"
    )


BLOCK_PARTS = ["block products", "attention", "GELU", "LayerNorms", "weight and gradient casts"]


def step_parts(model: GPT, B: int, T: int) -> tuple[dict[str, tuple[Callable[[], object], int]], float]:
    """name -> (one call of the part, forward and backward, under bf16 autocast where the step has it; calls per
    step), and the FLOPs of the step's matrix products."""
    config = model.config
    C, L, V = config.emb_dim, config.n_layers, model.padded_vocab_size
    block = model.transformer.h[0].train()
    linears = [m for m in block.modules() if isinstance(m, Linear)]
    residual = torch.randn(B, T, C, requires_grad=True)
    attention_input = torch.randn(B, T, 3 * C, dtype=BF16, requires_grad=True)
    hidden = torch.randn(B, T, 4 * C, dtype=BF16, requires_grad=True)
    head_input = torch.randn(B * T, C, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (B * T,))
    clear = [residual, attention_input, hidden, head_input, *model.parameters()]

    def backward(out: torch.Tensor) -> None:
        """Backward from out (a gradient of ones), then every gradient dropped: each call starts as a step does."""
        out.backward(torch.ones_like(out))
        for t in clear:
            t.grad = None

    def whole_block():
        backward(block(residual))

    block_operands = [  # each Linear's x, W, output gradient g and b, in bf16
        (
            torch.randn(B * T, m.in_features, dtype=BF16),
            m.weight.detach().to(BF16),
            torch.randn(B * T, m.out_features, dtype=BF16),
            None if m.bias is None else m.bias.detach().to(BF16),
        )
        for m in linears
    ]

    def attention():
        q, k, v = attention_input.split(C, dim=2)
        heads = [t.view(B, T, config.n_heads, C // config.n_heads).transpose(1, 2) for t in (q, k, v)]
        backward(block.attn._sdpa(*heads, 0, None))

    weights = [m.weight for m in linears]
    gradients = [w.detach().to(BF16) for w in weights]

    head_x = torch.randn(B * T, C, dtype=BF16)
    head_w = model.lm_head.weight.detach().to(BF16)
    head_g = torch.randn(B * T, V, dtype=BF16)

    updated = GPT(config, pad_vocab=64)  # a model of its own for the update: the parts above drop their gradients
    optimizer = configure_optimizer(updated, TrainingConfig(), torch.device("cpu"))
    for p in updated.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    parts = {
        "blocks": (whole_block, L),
        "block products": (lambda: [three_products(*operands) for operands in block_operands], L),
        "attention": (attention, L),
        "GELU": (lambda: backward(block.mlp.act(hidden)), L),
        "LayerNorms": (lambda: backward(block.ln_1(residual)), 2 * L),
        "weight and gradient casts": (lambda: ([w.to(BF16) for w in weights], [g.float() for g in gradients]), L),
        "LM head + loss": (
            lambda: backward(linear_cross_entropy(head_input, model.lm_head.weight, targets, config.vocab_size)),
            1,
        ),
        "LM head products": (lambda: three_products(head_x, head_w, head_g), 1),
        "AdamW update": (optimizer.step, 1),
        "gradient norm": (lambda: torch.nn.utils.get_total_norm([p.grad for p in updated.parameters()]), 1),
    }
    block_flops = sum(2 * B * T * m.in_features * m.out_features for m in linears)
    flops = 3 * (L * block_flops + 2 * B * T * C * V)  # forward + the two gradients of each product
    return {name: (_autocast(run), count) for name, (run, count) in parts.items()}, flops


def three_products(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """A Linear's training products as PlannedLinear runs them: x W^T (+ b), g W, g^T x."""
    cpu_matmul.mm(x, w.t(), bias)
    cpu_matmul.mm(g, w)
    cpu_matmul.mm(g.t(), x)


def _autocast(run: Callable[[], object]) -> Callable[[], object]:
    def under_autocast():
        with torch.autocast("cpu", dtype=BF16):
            run()

    return under_autocast


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
