"""Matmuls for training on CPUs in bf16, each shape cut into the row blocks that run fastest on this machine.

oneDNN, which runs PyTorch's bf16 matmuls on a CPU, picks its own blocking and threading for each shape, and some
shapes of a GPT-2 step come out far below the rest. On the project's 2-core AMX machine,
(1024 x 3072) @ (3072 x 768) runs at ~1,100 GFLOP/s while its two halves of 512 rows, one after the other, run at
~2,000; so do several other products with 768 columns (GPT-2 124M: ~90 ms of a 1.2 s step). Which shapes gain
differs from one CPU and library version to the next, so nothing is assumed: the first time a shape is met, `mm`
times it whole and in two blocks of rows and keeps the faster (the split has to win by SPLIT_MARGIN).
`choose` keeps other such choices with them (cpu_attention.py: the flash kernel or the scores written out).
GPT2SCRATCH_CPU_MATMUL_PLANS=0 in the environment runs every product whole and takes the first of each choice.

A split changes the rounding of some results (the library sums in another order for another shape), so the
choices are part of a run's state: the trainer saves `plans()` with each checkpoint and `set_plans` restores them
on --resume, so that a resumed run computes exactly what the uninterrupted one did.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

SPLITS = (1, 2)  # row blocks tried (4 won by a few percent at most where 2 won; each costs time at a run's start)
SPLIT_MARGIN = 0.9  # a split is kept only if it takes at most this share of the whole product's time
MIN_ROWS = 256  # rows per block at least
MIN_WORK = 1 << 28  # multiply-adds below which a product runs whole, untimed (too short to gain much)
TRIALS = 3  # timed runs of each candidate, interleaved; the median counts

TIMED = os.environ.get("GPT2SCRATCH_CPU_MATMUL_PLANS", "1") != "0"  # 0: every product whole, nothing timed

_plans: dict[str, int] = {}  # a product's shape -> row blocks (mm); a choice's key -> its index (choose)


def planned(x: torch.Tensor) -> bool:
    """Whether a training matmul on x goes through `mm`: bf16 on a CPU, not inside torch.compile (inductor picks
    its own kernels)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.compiler.is_compiling()


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias), a (M, K), b (K, N), bias (N,): the rows of a in the number of blocks planned for this shape."""
    key = _key(a, b, bias)
    parts = _plans.get(key)
    if parts is None:
        parts = _plans[key] = _choose(a, b, bias)
    return _split_mm(a, b, bias, parts)


def plans() -> dict[str, int]:
    """The choices made so far (key -> row blocks or index), for a checkpoint."""
    return dict(_plans)


def set_plans(saved: dict[str, int]) -> None:
    """Restore choices saved by `plans()` (they replace this process's for the same shapes)."""
    _plans.update({str(key): int(parts) for key, parts in saved.items()})


def _key(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> str:
    layout = "".join("n" if t.stride(-1) == 1 else "t" for t in (a, b))  # row-major or a transposed view
    bias_text = "+bias" if bias is not None else ""
    return f"{a.dtype} {a.size(0)}x{a.size(1)}x{b.size(1)} {layout}{bias_text} {torch.get_num_threads()} threads"


def _split_mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    if parts == 1:
        return a @ b if bias is None else torch.addmm(bias, a, b)
    out = a.new_empty(a.size(0), b.size(1))
    rows = -(-a.size(0) // parts)
    for start in range(0, a.size(0), rows):
        if bias is None:
            torch.mm(a[start : start + rows], b, out=out[start : start + rows])
        else:
            torch.addmm(bias, a[start : start + rows], b, out=out[start : start + rows])
    return out


def choose(key: str, candidates: Callable[[], list[Callable[[], object]]]) -> int:
    """Which of several ways of doing the same work to use for `key`: the index of the fastest of `candidates()`,
    timed the first time `key` is met and remembered with the other plans (0 when GPT2SCRATCH_CPU_MATMUL_PLANS=0)."""
    choice = _plans.get(key)
    if choice is None:
        choice = _plans[key] = _fastest(candidates()) if TIMED else 0
    return choice


def _choose(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> int:
    """The number of row blocks that runs a @ b fastest here (1 for small products)."""
    candidates = [parts for parts in SPLITS if a.size(0) // parts >= MIN_ROWS]
    if not TIMED or len(candidates) < 2 or a.size(0) * a.size(1) * b.size(1) < MIN_WORK:
        return 1
    return candidates[_fastest([lambda parts=parts: _split_mm(a, b, bias, parts) for parts in candidates])]


def _fastest(candidates: list[Callable[[], object]]) -> int:
    """The index of the candidate with the shortest median time (each run once untimed, then TRIALS times,
    interleaved); the first one unless another takes at most SPLIT_MARGIN of its time."""
    for run in candidates:  # first run of each: the library builds its kernels for the shape
        run()
    seconds: list[list[float]] = [[] for _ in candidates]
    for _ in range(TRIALS):
        for i, run in enumerate(candidates):
            started = time.perf_counter()
            run()
            seconds[i].append(time.perf_counter() - started)
    median = [statistics.median(times) for times in seconds]
    fastest = min(range(len(candidates)), key=median.__getitem__)
    return fastest if median[fastest] <= SPLIT_MARGIN * median[0] else 0
