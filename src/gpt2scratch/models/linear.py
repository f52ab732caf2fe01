"""nn.Linear, whose products go through cpu_matmul when training under bf16 autocast on a CPU; and DecodingLinear,
which multiplies a batch's one-token decoding steps by a oneDNN-packed copy of its weight on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2scratch.models import cpu_matmul


class Linear(nn.Linear):
    """The same module and parameters as nn.Linear (so checkpoints, FSDP and Hugging Face conversion see no
    difference). Under bf16 autocast on a CPU, forward and backward run autocast's arithmetic (bf16 copies of the
    input, weight and bias, fp32 gradients for fp32 parameters) with each product planned by cpu_matmul.mm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _bf16_autocast_on_cpu(x):
            return F.linear(x, self.weight, self.bias)
        return PlannedLinear.apply(x, self.weight, self.bias)


def _bf16_autocast_on_cpu(x: torch.Tensor) -> bool:
    """Training (grad enabled: evaluation's shapes are not worth timing) under bf16 autocast on a CPU."""
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.compiler.is_compiling()
    )


class PlannedLinear(torch.autograd.Function):
    """y = x W^T + b as autocast's addmm computes it, and its backward as autograd's (grad_x = g W,
    grad_W = g^T x, grad_b = sum of g's rows, each in bf16 and then cast to its parameter's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
            w = weight.to(torch.bfloat16)
            b = None if bias is None else bias.to(torch.bfloat16)
            y = cpu_matmul.mm(rows, w.t(), b)
        ctx.save_for_backward(rows, w)
        ctx.shape, ctx.dtypes = x.shape, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, w = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        with torch.autocast("cpu", enabled=False):
            g = grad.reshape(-1, grad.size(-1)).to(torch.bfloat16)
            if ctx.needs_input_grad[0]:
                grad_x = cpu_matmul.mm(g, w).view(ctx.shape).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = cpu_matmul.mm(g.t(), rows).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b


class DecodingLinear(nn.Linear):
    """A Linear for fp32 decoding on a CPU (generation.decoding_layout), with the same parameters.

    One-token steps of several rows (a batch in `generate`, the server's continuous batch) multiply by a copy of
    the weight packed once in oneDNN's blocked layout: 2-16 rows about 1.3-2.3x faster than MKL's sgemm on
    either layout (GPT-2 124M on a 2-core Xeon: the 50,304-row head at 16 rows 27 -> 15 ms, a step 118 -> 72 ms).
    Everything else (one row, prompts, training) takes F.linear, bit for bit as before. The copy costs the
    weight's bytes once more; it is made at the first such step and again whenever the weight changes."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodingLinear:
        """The same Parameter objects (so tying, state_dict and optimizers see no difference)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _batched_step(x, self.weight):
            packed = packed_weight(self)
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


PACKED_ROWS = 16  # the row count oneDNN packs a weight for (any count works; the server's default batch)


def packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The oneDNN copy of module.weight for torch.ops.mkldnn._linear_pointwise, kept on the module and packed
    again if the weight changed since; None where oneDNN cannot (a build without oneDNN's linear for its dtype)."""
    key = (module.weight.data_ptr(), module.weight._version)
    cached = getattr(module, "_packed", None)
    if cached is None or cached[0] != key:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACKED_ROWS)
        except (RuntimeError, AttributeError):
            packed = None
        module._packed = cached = (key, packed)
    return cached[1]


def _batched_step(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (B, 1, C) with B >= 2, fp32 on a CPU, no gradient, not being compiled: one decoding step of a batch."""
    return (
        not torch.compiler.is_compiling()  # first: a compiled graph gets no guard from the checks below
        and x.dim() == 3
        and x.size(1) == 1
        and x.size(0) >= 2
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
    )
