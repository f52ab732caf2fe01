"""nn.Linear, whose products go through cpu_matmul when training under bf16 autocast on a CPU."""

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
