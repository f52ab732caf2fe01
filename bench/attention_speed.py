"""Which attention kernel: causal `scaled_dot_product_attention` forward and forward + backward with each SDPA
backend that takes the input, on GPT-2 124M's attention shape (batch x 12 heads x 1024 x 64) by default.

    python bench/attention_speed.py                       # on what it finds, bf16 on a GPU, fp32 on a CPU
    python bench/attention_speed.py --batch-size 16 --dtype bf16

PyTorch picks the backend itself, by a fixed priority (flash attention first, cuDNN first on some GPUs and
builds); the table says which one it picked ("auto") beside each backend forced with `sdpa_kernel`, so the
default can be checked against the fastest. TFLOP/s count the causal half of the products: 2 x 2 x B x H x T^2 / 2
x hs forward, 2.5 times that forward + backward. Medians of --repeats timings after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from gpt2scratch.runtime import pick_device
from train_speed import SDPA_FIRST as BACKENDS  # name -> SDPBackend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bf16 on a GPU, else fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device, _ = pick_device(args.device)
    dtype = DTYPES[
        "bf16" if args.dtype == "auto" and device.type == "cuda" else "fp32" if args.dtype == "auto" else args.dtype
    ]
    shape = (args.batch_size, args.heads, args.context, args.head_size)
    flops = 2 * 2 * args.batch_size * args.heads * args.context**2 / 2 * args.head_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"causal attention {tuple(shape)} {dtype}, {name}, torch {torch.__version__}; medians of {args.repeats}")
    print(f"{'backend':>10} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}  kernel")
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)
    for label in ("auto", *BACKENDS):
        backends = list(BACKENDS.values()) if label == "auto" else [BACKENDS[label]]
        try:
            with sdpa_kernel(backends):
                forward = _median_seconds(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, args.repeats
                )
                both = _median_seconds(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad), device, args.repeats
                )
                kernel = _kernel_name(q, k, v, device)
        except RuntimeError as error:  # this backend does not take this input on this device
            print(f"{label:>10} {'-':>8} {'-':>8} {'-':>11} {'-':>8}  not available: {str(error).splitlines()[0][:80]}")
            continue
        print(
            f"{label:>10} {forward * 1e3:>8.3f} {flops / forward / 1e12:>8.2f} {both * 1e3:>11.3f} "
            f"{2.5 * flops / both / 1e12:>8.2f}  {kernel}"
        )


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and the backend's first-call setup)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _kernel_name(q, k, v, device: torch.device) -> str:
    """The aten operator the call dispatched to (the backend's own), read from the profiler."""
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        _sync(device)
    names = [
        event.key for event in prof.key_averages() if "scaled_dot_product" in event.key and "_attention" in event.key
    ]
    names = [n for n in names if n != "aten::scaled_dot_product_attention"]
    return names[0].removeprefix("aten::") if names else "?"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
