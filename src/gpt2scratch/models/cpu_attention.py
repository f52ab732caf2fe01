"""Causal attention for training on CPUs: PyTorch's flash kernel, or the scores written out, whichever is faster.

The CPU flash kernel is slow in bf16 for short sequences and narrow heads: for the `cpu` preset's attention (16 x
4 heads x 256 positions x 32), forward + backward take ~16 ms in bf16 (~10 ms in fp32), where the same attention
written out (the (T, T) scores in three batched matmuls, PyTorch's softmax and softmax-backward kernels) takes
~8 ms: a tenth of that preset's step, four layers. For GPT-2 124M's (1 x 12 x 1024 x 64) the flash kernel is the
faster one. So the first time a shape is trained on, both are timed (cpu_matmul.choose, with the matmul plans,
saved in checkpoints: the two round differently) and the faster one is kept. The written-out path keeps the
softmax of the scores for the backward pass, so it is only tried where that is at most MAX_SCORES values a layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2scratch.models import cpu_matmul

MAX_SCORES = 1 << 24  # batch x heads x T x T: 32 MB of bf16 probabilities kept per layer at most


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v for (B, nh, T, hs) tensors, through the flash kernel or
    CausalAttention, as planned for this shape when training on a CPU."""
    return CausalAttention.apply(q, k, v) if _written_out(q, k, v) else flash(q, k, v)


def _written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    B, nh, T, hs = q.shape
    if (
        q.device.type != "cpu"
        or torch.compiler.is_compiling()
        or not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        or B * nh * T * T > MAX_SCORES
    ):
        return False
    dtype = _compute_dtype(q)
    key = f"attention {dtype} {B}x{nh}x{T}x{hs} {torch.get_num_threads()} threads"
    candidates = lambda: [_timed(flash, q, k, v, dtype), _timed(CausalAttention.apply, q, k, v, dtype)]  # noqa: E731
    return cpu_matmul.choose(key, candidates) == 1


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _timed(attention, q, k, v, dtype):
    """Forward and backward of `attention` on copies of q, k, v in the dtype it computes in, as a candidate for
    cpu_matmul.choose (no random numbers drawn: the run's RNG stream stays as it is)."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    grad_out = torch.ones_like(inputs[0])

    def run():
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            out = attention(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    return run


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype


class CausalAttention(torch.autograd.Function):
    """Causal attention with the (T, T) scores written out, as the math path computes it (the scores in q's
    dtype, the softmax with fp32 sums inside), and its backward: dv = P^T dO, dS = P * (dO v^T - rowsum(...))
    (PyTorch's softmax backward), dq = dS k / sqrt(hs), dk = dS^T q / sqrt(hs). Under autocast, in its dtype."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, nh, T, hs = q.shape
        ctx.dtypes = q.dtype, k.dtype, v.dtype
        dtype = _compute_dtype(q)
        with torch.autocast("cpu", enabled=False):
            q = (q.to(dtype) * (1.0 / math.sqrt(hs))).reshape(B * nh, T, hs)
            k, v = k.to(dtype).reshape(B * nh, T, hs), v.to(dtype).reshape(B * nh, T, hs)
            above_diagonal = torch.full((T, T), float("-inf"), dtype=dtype, device=q.device).triu(1)
            probs = torch.softmax(torch.baddbmm(above_diagonal, q, k.transpose(1, 2)), dim=-1)  # (B nh, T, T)
            out = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, probs)
        return out.view(B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors  # q already scaled by 1 / sqrt(hs)
        shape = grad_out.shape
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(q.dtype).reshape(q.shape)
            grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
            grad_scores = torch._softmax_backward_data(torch.bmm(grad_out, v.transpose(1, 2)), probs, -1, probs.dtype)
            grad_q = torch.bmm(grad_scores, k).mul_(1.0 / math.sqrt(q.size(-1)))
            grad_k = torch.bmm(grad_scores.transpose(1, 2), q)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return grad_q.view(shape).to(q_dtype), grad_k.view(shape).to(k_dtype), grad_v.view(shape).to(v_dtype)
