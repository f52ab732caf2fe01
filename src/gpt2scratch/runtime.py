"""Where a run executes: device, precision, ranks (torchrun), and the distributed wrapping of the model.

    runtime = setup_runtime(config.training)   # reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE, starts the group
    model = shard(model, runtime, fsdp)         # FSDP2: before the optimizer is built
    model = wrap(model, runtime, fsdp, compile) # torch.compile, then DDP: after the weights are loaded

`auto` choices are made from what the machine reports (CUDA, MPS, the CPU's bfloat16 instructions), never from
an assumption, and logged with their reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 peak FLOP/s of one GPU, for MFU, from NVIDIA's datasheets; the first key found in
# torch.cuda.get_device_name() wins, so the more specific names come first. --peak-tflops overrides it.
PEAK_BF16_FLOPS = {
    "GB200": 2500e12,
    "B200": 2250e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "H20": 148e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "A6000": 155e12,  # RTX A6000
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A40": 150e12,
    "A30": 165e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 6000 Ada": 364e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
    "T4": 65e12,  # fp16 tensor cores (no bf16)
}


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    compile: bool
    peak_flops_per_device: float | None = None  # from --peak-tflops; None: look the GPU up by name
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs its loss scaled; for other precisions the scaler is disabled and every call passes through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Batches from the loader onto the device (pinned memory, asynchronous, on CUDA)."""
        tensors = [torch.from_numpy(array) for array in arrays]
        if self.device.type == "cuda":
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    def peak_flops(self) -> float | None:
        """Peak bf16 FLOP/s of all ranks together: --peak-tflops, else the GPU's from the table (None: no MFU)."""
        peak = self.peak_flops_per_device
        if peak is None and self.device.type == "cuda":
            peak = gpu_peak_flops(torch.cuda.get_device_name(self.device))
        return None if peak is None else peak * self.world_size


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name), None if not in the table."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a model on `device` (GPU memory, or the machine's available RAM); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
        line = next((line for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
        return int(line.split()[1]) * 1024 if line else None
    return None


def torchrun_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) in a plain process."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )


def init_distributed(device: torch.device, world_size: int) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo elsewhere); nothing to do in a single process."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place across ranks (sum, min or max) and return it; unchanged in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def pick_device(requested: str, local_rank: int = 0) -> tuple[torch.device, str]:
    """The device to run on, and why."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(requested)):
        raise ValueError(f"device {requested!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested} was asked for, but CUDA is not available; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {requested} was asked for, but MPS is not available; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device, "as asked"
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank), f"CUDA is available ({torch.cuda.get_device_name(local_rank)})"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "Apple MPS is available"
    return torch.device("cpu"), "no GPU found"


def pick_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The autocast precision (fp32, bf16 or fp16), and why."""
    if requested != "auto":
        return requested, "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bfloat16"
        return "fp16", "the GPU has no bfloat16: float16 with a gradient scaler"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "the CPU has native bfloat16 instructions (avx512_bf16/amx): ~1.5x faster than fp32"
    return "fp32", f"{device.type}: full precision (bf16 would be emulated)"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: nothing to read, nothing assumed
        return ""


def cpu_has_native_bf16() -> bool:
    flags = _cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_has_amx_bf16() -> bool:
    return " amx_bf16" in _cpuinfo()


def cpu_has_int8_dot_product() -> bool:
    """VNNI or AMX int8 instructions, which torch._int_mm's int8 x int8 products run on."""
    flags = _cpuinfo()
    return any(f" {flag}" in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


# What emulated bf16 costs (torch 2.13, 2 cores). A Xeon with AVX-512 but no bf16 instructions (2026-12-06): the
# 2048^3 matmul at 60 GFLOP/s in bf16 against 311 in fp32; a GPT-2 124M training step (batch 1 x 1024,
# `bench/train_speed.py --precision bf16` / `fp32`) 15.5 s against 3.7 s; a 1024-row product 5x slower. An AMD
# EPYC with AVX2 only (2026-12-07): 768 x 3072 products 4.4x slower than fp32 at 64 rows, and 2048^3 (both
# operands row-major) at 0.3 GFLOP/s against fp32's 89 in the same process: 300x.
EMULATED_BF16 = (
    "bf16 on this CPU is emulated (no avx512_bf16 or amx_bf16 instructions): its matmuls run 5x slower than "
    "fp32's here, or far more on CPUs without AVX-512"
)


def cpu_bf16_is_emulated() -> bool:
    """An x86 CPU without bf16 instructions (where cpu_has_native_bf16 can tell: Linux)."""
    return _x86_linux() and not cpu_has_native_bf16()


def cpu_int8_is_emulated() -> bool:
    """An x86 CPU without int8 dot-product instructions (VNNI, AMX), where torch._int_mm has no fast kernel: on an
    AVX2-only AMD EPYC (2026-12-07) 17 x 768 by 768 x 3072 took 20.8 ms against fp32's 1.5."""
    return _x86_linux() and not cpu_has_int8_dot_product()


def _x86_linux() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and Path("/proc/cpuinfo").is_file()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory a training step frees, for the next step to reuse.

    By default glibc serves each large block (the logits, their gradient, attention weights: megabytes each) with
    a fresh mmap and gives it back to the kernel when freed, so every step faults in and zeroes its activations'
    pages again: a third of a small CPU model's step went to the kernel (`sys` time); with this the `cpu` preset's
    step went from 258 to 180 ms. `generate`, `serve` and `eval` call it too (each decoding step frees and allocates
    its logits and activations). Process-wide; the process then holds its peak memory until it exits. Linux with
    glibc only (elsewhere a no-op, returns False); GPT2SCRATCH_KEEP_FREED_MEMORY=0 turns it off.
    """
    if os.environ.get("GPT2SCRATCH_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Large blocks from the heap, not mmap; trim the heap's top only past 2 GiB free; grow it 256 MiB at a time.
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 256 << 20}
    return all(libc.mallopt(option, value) == 1 for option, value in settings.items())


_OMP_PAUSE_HARD = 2  # omp_pause_resource_t (OpenMP 5.0)


def release_openmp_threads() -> bool:
    """Let the OpenMP worker threads of the calling thread go (GNU libgomp, the OpenMP of PyTorch's Linux wheels).

    libgomp keeps a team of worker threads for each thread that has run a parallel CPU op, until that thread ends.
    Once the process holds more of them than the machine has cores, its idle workers stop spinning and sleep, and
    every parallel op then pays for waking them up: in a server whose main thread had loaded and compiled the
    model, the engine thread took 29 ms for a compiled int8 GPT-2 124M step at batch 16 that takes 15 ms when no
    other thread has a team (eager fp32: 65 vs 55 ms), on this project's 2-core machine. Call it from a thread that
    is done with parallel work: a later parallel op there makes a new team. Returns whether a team was let go
    (False without libgomp, or where /proc is missing).
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    released = False
    for path in sorted({line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}):
        try:
            pause = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)  # libgomp of GCC >= 9
        except OSError:  # a library file replaced since it was loaded ("... (deleted)")
            continue
        if pause is not None:
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            released |= pause(_OMP_PAUSE_HARD) == 0
    return released


def setup_runtime(training) -> Runtime:
    """Read torchrun's environment, pick device and precision, start the process group (`training`: the
    TrainingConfig's device, precision and compile settings)."""
    rank, local_rank, world_size = torchrun_ranks()
    device, device_reason = pick_device(training.device, local_rank)
    precision, precision_reason = pick_precision(training.precision, device)
    use_compile = training.compile == "on" or (training.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for fp32 matmuls (the weights' own fp32 work under autocast too): 10 mantissa bits, GPT-2
        # training does not notice, and up to 8x the fp32 rate.
        torch.backends.cuda.matmul.allow_tf32 = training.tf32
        torch.backends.cudnn.allow_tf32 = training.tf32
    init_distributed(device, world_size)
    kept = keep_freed_memory()
    peak = training.peak_tflops * 1e12 if training.peak_tflops else None
    runtime = Runtime(device, precision, use_compile, peak, rank, local_rank, world_size)
    if runtime.is_main:
        log.info(f"device: {device} ({device_reason}); precision: {precision} ({precision_reason})")
        if device.type == "cpu" and precision == "fp16":
            log.warning("fp16 on a CPU is emulated and slow; it is meant for checking the fp16 path")
        if device.type == "cpu" and precision == "bf16" and cpu_bf16_is_emulated():
            log.warning(f"{EMULATED_BF16}; --precision auto (fp32 on this CPU) trains faster")
        features = [
            f"torch.compile {'on' if use_compile else 'off'}",
            f"fused AdamW {'on' if training.fused_adamw else 'off'}",
            f"vocabulary padded to a multiple of {training.pad_vocab}" if training.pad_vocab > 1 else "no padding",
            f"activation checkpointing {'on' if training.activation_checkpointing else 'off'}",
            f"freed memory {'kept for reuse' if kept else 'returned to the OS'}",
        ]
        if device.type == "cuda":
            features.append(f"TF32 {'on' if training.tf32 else 'off'}")
            peak_all = runtime.peak_flops()
            name = torch.cuda.get_device_name(device)
            features.append(
                f"MFU against {peak_all / world_size / 1e12:g} TFLOP/s per GPU ({name})"
                if peak_all
                else f"no MFU: {name} is not in the peak-FLOPs table (set --peak-tflops)"
            )
        log.info(f"{'; '.join(features)}; ranks: {world_size}")
    return runtime


def shard(model: torch.nn.Module, runtime: Runtime, fsdp: bool) -> torch.nn.Module:
    """FSDP2: each block, then the whole model, sharded across the ranks (in place; before the optimizer)."""
    if not fsdp:
        return model
    if not runtime.distributed:
        raise ValueError("--fsdp shards the model across ranks: launch with torchrun --nproc_per_node=N")
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def wrap(model: torch.nn.Module, runtime: Runtime, fsdp: bool, compile: bool) -> torch.nn.Module:
    """The module the training step calls: compiled, and under DDP when there are several ranks (FSDP2 shards
    in place instead). The unwrapped model keeps the weights: checkpoints are saved from it."""
    if compile:
        model = torch.compile(model)
    if runtime.distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model
