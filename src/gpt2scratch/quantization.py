"""The dtype a model decodes in (`--dtype` of generate, serve and eval): fewer bytes read per token.

A decoding step at batch 1 reads every weight once, so on a CPU its speed is the memory bandwidth over the
weights' bytes: fp32 is 4 bytes a weight, bf16 2, int8 1.

- fp32: the weights as trained.
- bf16: every matrix of the blocks and the LM head in bfloat16, multiplied in bf16.
- int8: weight-only int8 for the same matrices, symmetric per output channel (scale = max |w| of the row / 127),
  multiplied by PyTorch's own `_weight_int8pack_mm` on CPUs with bf16 inputs (its fast path: with fp32 inputs
  it is ten times slower), a dequantised F.linear on other devices. On a CPU without bfloat16 instructions, a
  prompt's products (WIDENED_ROWS rows or more) take the weight widened to fp32 instead (below).
- int8-dynamic (W8A8): int8 weights as int8's, and each input row of those matrices quantized at run time to
  256 levels between its own minimum and maximum; the product is int8 x int8 -> int32 (`torch._int_mm`), exact.
  For batches on CPUs without bfloat16, where int8 weight-only and fp32 are both bound by fp32 arithmetic.
In all, the residual stream, embeddings, LayerNorms, attention and logits stay fp32: only the weights are
rounded, and in int8-dynamic the matrices' inputs (bf16 activations through the residual stream cost top-1
agreement with fp32, not speed: a decoding step's time is the weights' bytes).
- auto: bf16 on CPUs with native bfloat16 instructions (avx512_bf16 / AMX), fp32 elsewhere, GPUs included (there a
  decoding step is bound by kernel launches, not weight bytes: bf16 measured 0.59x fp32's speed on an H200).
  On a CPU without bfloat16 it says that int8 decodes faster there at batch 1 (int8pack_mm widens bf16 inputs in
  registers) and int8-dynamic in batches (integer products; fp32 with DecodingLinear's packed weights beats int8
  weight-only there); on one without int8 dot-product instructions either (AVX2 only), int8 with --compile.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gpt2scratch.models.linear import Linear, packed_weight
from gpt2scratch.options import DTYPES  # noqa: F401  (one list for the flags and this module)
from gpt2scratch.runtime import cpu_bf16_is_emulated, cpu_has_amx_bf16, cpu_has_native_bf16, cpu_int8_is_emulated


def pick_dtype(requested: str, device: torch.device) -> tuple[str, str]:
    """The dtype to decode in, and why."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested, "as asked"
    if device.type == "cuda":  # bench/generate_speed.py --device cuda: bf16 0.59x fp32's tokens/s (124M, H200)
        return "fp32", "on a GPU, decoding is bound by kernel launches, which bf16's casts add to, not by weight reads"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "the CPU has native bfloat16 instructions (avx512_bf16/amx)"
        # generate_speed.py, 124M batch 1, a Xeon without bf16: int8 1.5x fp32, compiled 3.4x
        # Without VNNI (an AVX2-only EPYC, 2026-12-07; 32-token prompts, 128 new tokens): eager int8 1.7x eager fp32
        # at batch 1, 0.9-1.1x at batch 8; compiled int8 1.9x and 1.4x compiled fp32 (130 and 268 tok/s)
        faster = (
            "--dtype int8 --compile decodes faster here, one prompt or a batch (int8 alone: one prompt)"
            if cpu_int8_is_emulated()
            else "--dtype int8 decodes one prompt at a time faster here, and --dtype int8-dynamic batches (a server), "
            "with --compile"
        )
        return "fp32", f"no native bfloat16 on this CPU; {faster}; 1-2% of top-1 choices changed"
    return "fp32", f"{device.type} without native bfloat16"


ROW_BLOCK = 64
# Rows from which Int8Linear, on a CPU that emulates bf16, multiplies by its weight widened to fp32 (the int8
# values times the row scales, after the product) rather than by _weight_int8pack_mm, which widens its bf16
# inputs in registers and runs at ~60% of MKL's fp32 rate there. 2-core Xeon without avx512_bf16 (2026-12-06),
# 768 x 3072: 16 rows 0.94 ms (kernel) vs 1.42 (widened), 32 rows 1.59 vs 1.46, 64 rows 3.26 vs 2.16, 1,024 rows
# 40.8 vs 23.2; the other matrices alike. Decoding steps (a row per sequence) keep the kernel.
WIDENED_ROWS = 64


@functools.cache
def _bf16_emulated() -> bool:
    return cpu_bf16_is_emulated()


# |q w| <= 128 * 127, so no partial sum of a product over 1,024 int8 inputs passes 2^24: in fp32 it is exact, in any
# order of summation. (Over GPT-2's 3,072, sums of inputs and weights of one sign did pass it.)
EXACT_INPUTS = 1024


@functools.cache
def _int8_emulated() -> bool:
    return cpu_int8_is_emulated()


class Int8Linear(nn.Module):
    """y = x W^T * scale + b with W stored as int8 (out, in) and one fp32 scale per output row; the product is
    taken in bf16 (the kernel's fast path), in and out in the caller's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        weight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # Rows padded with zeros to a multiple of ROW_BLOCK: the CPU kernels (eager and inductor's) work on blocks
        # of output rows, and GPT-2's 50,257-row head ends in a slow partial block (50,304 rows decode faster).
        pad = -weight.size(0) % ROW_BLOCK
        self.register_buffer("weight", F.pad(weight, (0, 0, 0, pad)))
        self.register_buffer("scales", F.pad(scale, (0, pad), value=1.0).to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.product(x.reshape(-1, shape[-1]))[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (rows, in) times the scaled weight: (rows, padded out). The inputs are rounded to bf16 either way."""
        x2 = x2.to(torch.bfloat16)
        if x2.device.type == "cpu":
            if x2.size(0) >= WIDENED_ROWS and not torch.compiler.is_compiling() and _bf16_emulated():
                return torch.mm(x2.float(), self.weight.float().t()).mul_(self.scales.float())  # fp32 out
            return torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        return F.linear(x2, self.weight.to(torch.bfloat16)) * self.scales


class Int8DynamicLinear(Int8Linear):
    """W8A8: the weight as in Int8Linear (int8, one scale per output row), and the input quantized too, at run time,
    each row to uint8 with its own scale and zero point (asymmetric: GELU outputs are mostly positive); the
    product is int8 x int8 -> int32 (`torch._int_mm`: VNNI / AMX int8 instructions on CPUs), which is exact, and
    is scaled back to the caller's dtype. A row's result does not depend on the other rows of its batch.

    On a CPU without native bfloat16, where Int8Linear widens its inputs to fp32 and a batched step is bound by
    fp32 arithmetic, integer products run about 2-3x faster than fp32 (16-32 rows of GPT-2 124M's matrices).
    Without VNNI or AMX (an AVX2-only CPU) they are not: there the same integers are multiplied in fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.scales = self.scales.float()
        # x = s (q + 128 - z) with q = round(x / s) + z - 128 in int8, so x W^T = s (q W^T + (128 - z) sum_k W)
        self.register_buffer("row_sums", self.weight.sum(dim=1, dtype=torch.int32))
        # On a CPU without int8 dot-product instructions, where _int_mm is ~14x slower than fp32, the integer
        # product is taken in fp32 instead (see product; the layer on a CPU)
        self.widened = _int8_emulated()

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.float()
        low = x2.amin(dim=-1, keepdim=True).clamp(max=0)
        high = x2.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.round(-low / scale)  # in [0, 255]
        q = (torch.round(x2 / scale) + (zero - 128)).clamp(-128, 127).to(torch.int8)
        if x2.device.type != "cpu":  # (CUDA's _int_mm wants more than 16 rows; fp32 sums of these are close to exact)
            acc = F.linear(q.float(), self.weight.float())
        elif self.widened:  # the same integers as _int_mm's: each product over EXACT_INPUTS inputs is exact in fp32
            w = self.weight.float()
            acc = sum(
                torch.mm(a.float(), b.t()).int()
                for a, b in zip(q.split(EXACT_INPUTS, 1), w.split(EXACT_INPUTS, 1), strict=True)
            )
        else:
            acc = torch._int_mm(q, self.weight.t())
        return (acc + (128 - zero).int() * self.row_sums).float() * (scale * self.scales)


@functools.cache
def _packs_bf16() -> bool:
    """Whether BF16Linear multiplies by a oneDNN-packed copy of its weight: on a CPU with avx512_bf16 but no AMX,
    where F.linear reorders the weight for oneDNN at every call. 2-core AMD EPYC (2026-12-07), 124M's matrices,
    each read from memory: one row 0.11 / 0.03 / 0.16 / 0.10 ms (qkv, attention and MLP projections) and 2.3 ms
    (head) packed, against 0.21 / 0.05 / 0.27 / 0.28 and 4.1 by F.linear and 0.34 / 0.07 / 0.43 / 0.26 and 7.1 by
    torch.mv; 8 rows about 2x faster than F.linear, 512 rows 2-10%; the same values as F.linear's, bit for bit.
    Elsewhere (not measured there) one row goes through torch.mv, which on a Xeon with AMX was about 1.3x faster
    than F.linear for a block's matrices and 1.9x for the head, and more rows through F.linear."""
    return cpu_has_native_bf16() and not cpu_has_amx_bf16() and torch.backends.mkldnn.is_available()


class BF16Linear(nn.Linear):
    """nn.Linear with a bf16 weight: the product in bf16, in and out (and the bias) in the caller's dtype. On a
    CPU, not compiled, by the fastest way measured for that CPU (_packs_bf16); the packed copy costs the weight's
    bytes once more."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x.to(self.weight.dtype)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (..., in) in bf16 times the weight: (..., out) in bf16."""
        if x2.device.type != "cpu" or torch.compiler.is_compiling():
            return F.linear(x2, self.weight)
        if _packs_bf16():
            packed = None if torch.is_grad_enabled() else packed_weight(self)
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
        elif x2.numel() == self.in_features:
            return torch.mv(self.weight, x2.reshape(-1)).view(*x2.shape[:-1], self.out_features)
        return F.linear(x2, self.weight)


class RefinedHead(nn.Module):
    """The LM head in bf16 or int8, with the REFINED largest logits of each row computed again from the fp32
    weights. The ranking of the likeliest tokens (greedy choices, top-1) is then fp32's: rounding the head is
    what moves near-ties (on the model `python main.py` trains, a bf16 head alone leaves 98.7% of top-1 choices
    equal to fp32's; refined, 99.9%), at the cost of reading REFINED rows more per token."""

    def __init__(self, head: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("exact", weight.detach().float(), persistent=False)  # (V, C)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)
        top = logits.topk(REFINED, dim=-1).indices  # (..., REFINED)
        exact = (self.exact[top] @ x.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, top, exact)


REFINED = 8


def apply_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """Convert an eval-mode GPT for decoding with `dtype` weights (fp32, bf16 or int8), in place; returns it.
    Only the matrices change (the blocks' and the LM head): the residual stream, embeddings, LayerNorms,
    attention and the logits stay fp32, so that what is rounded is the weights alone."""
    if dtype == "fp32":
        return model
    model.decoded_params = model.num_params()
    low = {"int8": Int8Linear, "int8-dynamic": Int8DynamicLinear, "bf16": BF16Linear.from_linear}[dtype]
    head = model.lm_head  # its own low-precision copy (a tied embedding stays fp32, for lookups and refining)
    model.lm_head = RefinedHead(low(head), head.weight)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child) in (nn.Linear, Linear):  # not one already converted
                    setattr(parent, name, low(child))
    model.decode_dtype = dtype
    return model
