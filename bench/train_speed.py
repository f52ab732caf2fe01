"""Benchmark training: tokens/s and MFU of ours against transformers' GPT2LMHeadModel, same config, optimizer and
precision, interleaved in one run.

    python bench/train_speed.py                                  # GPT-2 124M, batch 1 x 1024, on what it finds
    python bench/train_speed.py --drop-rate 0 0.1 --precision fp32 bf16   # the CPU table of issue 14
    python bench/train_speed.py --batch-size 16 --compile on --out results.json   # on a GPU
    python bench/train_speed.py --batch-size 16 --attention auto cudnn flash     # each SDPA backend first, on a GPU
    python bench/train_speed.py --batch-size 16 --compile-mode default reduce-overhead --unsynced   # on a GPU

One training step on each side is what `gpt2scratch train` does per micro-batch: forward under autocast,
cross-entropy, backward, gradient clipping at 1.0, a (fused) AdamW update with weight decay on the matrices,
skipped if the loss or the norm is not finite (trainer.update); the loss and the norm are read as the trainer
reads them: at once on a CPU, after the next step is queued on a GPU (so a step is timed as the mean over
--steps steps back to back).
Both models start from the same weights; ours pads its vocabulary to a multiple of 64 (as training does), theirs
is transformers' own GPT-2 (SDPA attention). Each round times --steps steps of every variant in turn, after
--warmup untimed steps (compilation happens there); the table shows medians over --rounds rounds and
ours / theirs. --compile-mode compiles both sides in each of torch.compile's modes (reduce-overhead: CUDA graphs).
--unsynced adds a column: the same steps back to back with one host sync after the last (clipping by
clip_grad_norm_, no skip of non-finite steps, nothing read), the speed of a loop that reads nothing from the GPU,
against the trainer's way.
MFU counts 6 x parameters + attention FLOPs per token (estimates.flops_per_token) against the GPU's dense bf16
peak; on a CPU, against the matmul rate this script measures for the precision used: in each round, before that
round's steps, the fastest of a 2048^3 product and the step's own products (every linear layer's forward, input
gradient and weight gradient shapes at this batch, in the operands' layouts as the step has them), each the best
of a few runs (of one, where a run takes seconds: emulated bf16); the median over the rounds. The
2048^3 product alone ran below the step's own shapes on an AMD EPYC in fp32 (146-189 against 150-183 GFLOP/s), so
MFU read over 100% there.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import time
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2scratch.config import TrainingConfig, resolve_config
from gpt2scratch.estimates import flops_per_token
from gpt2scratch.hf import hf_model_from_gpt
from gpt2scratch.models import GPT
from gpt2scratch.runtime import Runtime, gpu_peak_flops, keep_freed_memory, pick_device, pick_precision
from gpt2scratch.trainer import can_update_unread, configure_optimizer, update

SDPA_FIRST = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="model shape (default: GPT-2 124M)")
    parser.add_argument("--context", type=int, help="context length (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--drop-rate", type=float, nargs="+", default=[0.0])
    parser.add_argument("--precision", nargs="+", default=["auto"], help="auto, fp32, bf16, fp16 (several: each)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=("auto", *SDPA_FIRST),
        default=["auto"],
        help="which SDPA backend comes first on both sides (auto: PyTorch's own priority; several: each)",
    )
    parser.add_argument(
        "--compile-mode",
        nargs="+",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        default=["default"],
        help="torch.compile's mode, on both sides (several: each)",
    )
    parser.add_argument("--unsynced", action="store_true", help="also time steps without per-step host reads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocations)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="ours only")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    device, _ = pick_device(args.device)
    keep_freed_memory()  # as `gpt2scratch train` runs (setup_runtime): each step reuses the last step's memory
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if not use_compile:
        args.compile_mode = [None]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = resolve_config(args.preset).model
    if args.context:
        base = replace(base, context_length=args.context)
    tokens = args.batch_size * base.context_length
    flops = flops_per_token(base)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"{args.preset} ({GPT(base).num_params():,} parameters), batch {args.batch_size} x {base.context_length}, "
        f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, compile {use_compile}; "
        f"medians of {args.rounds} interleaved rounds of {args.steps} steps"
    )
    ceilings = {}
    rates: dict[str, list[float]] = {}  # CPU: the matmul rate measured in each round, beside the variants
    variants = []
    for precision in args.precision:
        precision, _ = pick_precision(precision, device)
        if device.type == "cuda":
            ceilings[precision] = gpu_peak_flops(name)
        else:
            rates[precision] = []
        for drop, attention, mode in itertools.product(args.drop_rate, args.attention, args.compile_mode):
            config = replace(base, drop_rate=drop)
            torch.manual_seed(0)
            ours = GPT(config, pad_vocab=64)
            sides = {"ours": ours}
            if not args.no_reference:
                sides["transformers"] = hf_model_from_gpt(GPT(config)).train()
            for side, model in sides.items():
                variants.append(Variant(side, precision, drop, model, device, mode, args.batch_size, attention))
    ceiling_shapes = ceiling_product_shapes(base, args.batch_size)
    for variant in variants:  # warm-up (and compilation) outside the timed rounds
        variant.steps(args.warmup)
    for _ in range(args.rounds):
        for precision, measured in rates.items():
            measured.append(matmul_ceiling(device, precision, ceiling_shapes))
        for variant in variants:
            variant.seconds.append(variant.steps(args.steps))
            if args.unsynced:
                variant.unsynced.append(variant.unsynced_steps(args.steps))
    for precision, measured in rates.items():  # the machine's rate moves by ~30% from one run to the next
        ceilings[precision] = statistics.median(measured)
        print(
            f"measured {precision} matmul rate (the fastest of 2048^3 and the step's {len(ceiling_shapes) - 1} "
            f"products, {torch.get_num_threads()} threads, each the best of 3 runs per round, or of fewer where "
            f"they took {REPEAT_BUDGET_S:g} s): "
            f"median {ceilings[precision] / 1e9:,.0f} GFLOP/s over the rounds "
            f"(range {min(measured) / 1e9:,.0f}-{max(measured) / 1e9:,.0f})"
        )

    results = []
    mode_column = f" {'compile mode':>26}" if len(args.compile_mode) > 1 else ""
    unsynced_column = f" {'unsynced ms/step':>16} {'MFU':>6}" if args.unsynced else ""
    print(
        f"\n{'precision':>9} {'dropout':>7} {'attention':>9}{mode_column} {'side':>12} {'ms/step':>9} {'tok/s':>9} "
        f"{'MFU':>6} {'ours/ref':>9}{unsynced_column}"
    )
    for variant in variants:
        seconds = statistics.median(variant.seconds)
        rate = tokens / seconds
        peak = ceilings[variant.precision]
        mfu = flops * rate / peak if peak else None
        same = [v for v in variants if v.setting == variant.setting]
        reference = next((v for v in same if v.side == "transformers"), None)
        ratio = statistics.median(reference.seconds) / seconds if reference and variant.side == "ours" else None
        unsynced = statistics.median(variant.unsynced) if variant.unsynced else None
        unsynced_mfu = flops * tokens / unsynced / peak if unsynced and peak else None
        results.append(
            dict(
                side=variant.side,
                precision=variant.precision,
                drop_rate=variant.drop,
                attention=variant.attention,
                compile_mode=variant.compile_mode,
                ms_per_step=seconds * 1000,
                unsynced_ms_per_step=None if unsynced is None else unsynced * 1000,
                tokens_per_sec=rate,
                mfu=mfu,
                ratio=ratio,
                peak_flops=peak,
            )
        )
        mode_cell = f" {str(variant.compile_mode):>26}" if mode_column else ""
        unsynced_cell = ""
        if args.unsynced:
            unsynced_cell = f" {unsynced * 1000:>16.1f} {'' if unsynced_mfu is None else f'{unsynced_mfu:.1%}':>6}"
        print(
            f"{variant.precision:>9} {variant.drop:>7g} {variant.attention:>9}{mode_cell} {variant.side:>12} "
            f"{seconds * 1000:>9.1f} {rate:>9,.0f} "
            f"{'' if mfu is None else f'{mfu:.1%}':>6} {'' if ratio is None else f'{ratio:.2f}x':>9}{unsynced_cell}"
        )
    peak_text = "the GPU's dense bf16 peak" if device.type == "cuda" else "the measured matmul rate of that precision"
    print(f"(MFU: {flops / 1e6:,.0f} MFLOP per token against {peak_text})")
    if args.out:
        meta = dict(
            device=name,
            torch=torch.__version__,
            preset=args.preset,
            batch_size=args.batch_size,
            context_length=base.context_length,
            compile=use_compile,
            rounds=args.rounds,
            steps=args.steps,
        )
        with open(args.out, "w") as f:
            json.dump({"train_speed": meta, "results": results}, f, indent=2)


class Variant:
    """One model in one precision: a training step as `gpt2scratch train` takes it, timed."""

    def __init__(self, side, precision, drop, model, device, compile_mode, batch_size, attention="auto"):
        self.side, self.precision, self.drop, self.attention = side, precision, drop, attention
        self.compile_mode = compile_mode  # None: eager
        self.setting = (precision, drop, attention, compile_mode)  # what ours and transformers share, to compare
        # PyTorch's own priority, or the named backend first (then the others, for inputs it does not take)
        self.backends = None
        if attention != "auto":
            self.backends = list(dict.fromkeys([SDPA_FIRST[attention], *SDPA_FIRST.values()]))
        self.model = model.to(device).train()
        self.runtime = Runtime(device, precision, compile_mode is not None)
        self.optimizer = configure_optimizer(self.model, TrainingConfig(), device)
        self.scaler = self.runtime.grad_scaler()
        self.defer_reads = device.type == "cuda" and can_update_unread([self.optimizer], self.scaler)  # as training
        self.forward = self.model if compile_mode is None else torch.compile(self.model, mode=compile_mode)
        self.device = device
        config = model.config
        vocab, context = config.vocab_size, getattr(config, "context_length", None) or config.n_positions
        generator = torch.Generator().manual_seed(1)
        self.batch = torch.randint(0, vocab, (batch_size, context + 1), generator=generator)
        self.seconds: list[float] = []
        self.unsynced: list[float] = []  # --unsynced: seconds a step, steps back to back without host reads

    def steps(self, steps: int) -> float:
        """Seconds a step over `steps` steps taken back to back as the trainer takes them: each step's loss and norm
        read at once, or (defer_reads) after the next step is queued."""
        with self._backends():  # compiled under it too
            synchronize(self.device)
            started = time.perf_counter()
            queued = None
            for _ in range(steps):
                loss = self._loss()
                self.scaler.scale(loss).backward()
                parameters = list(self.model.parameters())
                figures = update([self.optimizer], self.scaler, parameters, loss.detach(), 1.0, not self.defer_reads)
                self.optimizer.zero_grad(set_to_none=True)
                if queued is not None:
                    queued.values()
                queued = figures
            queued.values()
            return (time.perf_counter() - started) / steps

    def unsynced_steps(self, steps: int) -> float:
        """Seconds a step over `steps` steps taken back to back, reading nothing from the device until the last."""
        with self._backends():
            synchronize(self.device)
            started = time.perf_counter()
            for _ in range(steps):
                self.scaler.scale(self._loss()).backward()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            synchronize(self.device)
            return (time.perf_counter() - started) / steps

    def _backends(self):
        if self.backends is None:
            return contextlib.nullcontext()
        return sdpa_kernel(self.backends, set_priority=True)

    def _loss(self) -> torch.Tensor:
        x, y = self.runtime.to_device(self.batch[:, :-1].numpy(), self.batch[:, 1:].numpy())
        with self.runtime.autocast():
            if self.side == "ours":
                _, loss = self.forward(x, y, return_logits=False)
            else:  # transformers shifts the labels itself: give it the whole row
                full = torch.cat([x, y[:, -1:]], dim=1)
                loss = self.forward(input_ids=full[:, :-1], labels=full[:, :-1]).loss
        return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Seconds of runs of one product after which measure_matmul_flops stops repeating it. Emulated bf16 (an AVX2-only
# AMD EPYC, 2026-12-07) took 57 s for one 2048^3 product, so the first run plus three timed ones took ~4 minutes
# a round; a run that long is the product's time, not its set-up (oneDNN's kernels, the caches).
REPEAT_BUDGET_S = 2.0


def measure_matmul_flops(
    device: torch.device, precision: str, shape: tuple[int, int, int, str] = (2048, 2048, 2048, "nn"), repeats: int = 3
) -> float:
    """The rate of an (m, k) @ (k, n) matmul in `precision` on this device, each operand row-major ("n") or a
    transposed view of a row-major matrix ("t") as shape's layout says: the best of `repeats` runs after
    an untimed first one, or fewer where the runs so far took REPEAT_BUDGET_S (the first run's time counts if it
    is the only one)."""
    m, k, n, (a_layout, b_layout) = shape
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def operand(rows: int, cols: int, kind: str) -> torch.Tensor:
        if kind == "t":
            return torch.randn(cols, rows, device=device, dtype=dtype).t()
        return torch.randn(rows, cols, device=device, dtype=dtype)

    a, b = operand(m, k, a_layout), operand(k, n, b_layout)
    seconds: list[float] = []
    while len(seconds) <= repeats and sum(seconds) < REPEAT_BUDGET_S:
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return 2 * m * k * n / min(seconds[1:] or seconds)


def matmul_ceiling(device: torch.device, precision: str, shapes: list[tuple[int, int, int, str]]) -> float:
    """A CPU's matmul ceiling for a step: the rate of the fastest of these products."""
    return max(measure_matmul_flops(device, precision, shape) for shape in shapes)


def ceiling_product_shapes(config, batch_size: int, pad_vocab: int = 64) -> list[tuple[int, int, int, str]]:
    """(m, k, n, layout): a 2048^3 product of row-major matrices, then each distinct matrix product in a training
    step of `config`, in the layout nn.Linear's forward and backward give it: every linear layer's forward
    (rows x in) @ (out x in)^T ("nt"), its input gradient (rows x out) @ (out x in) ("nn") and its weight gradient
    (rows x out)^T @ (rows x in) ("tn"), the LM head's vocabulary padded as training pads it. (Layouts matter where
    bf16 is emulated: on an AVX2-only AMD EPYC, 512^3 ran at 1.3 GFLOP/s with both operands row-major, 18-23 with
    one transposed.)"""
    rows, width = batch_size * config.context_length, config.emb_dim
    vocab = math.ceil(config.vocab_size / pad_vocab) * pad_vocab
    layers = {(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width), (width, vocab)}
    step = {product for k, n in layers for product in ((rows, k, n, "nt"), (rows, n, k, "nn"), (n, rows, k, "tn"))}
    return [(2048, 2048, 2048, "nn"), *sorted(step)]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


if __name__ == "__main__":
    main()
