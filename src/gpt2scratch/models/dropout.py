"""Dropout for training on CPUs, where PyTorch's own is slow.

`F.dropout` on a CPU draws one 32-bit number per element from the Mersenne Twister (about 6 ns each on the
project's 2-core machines: 5 ms for one 1 x 1024 x 768 activation, 80 ms for one layer's 12 x 1024 x 1024
attention probabilities), and `scaled_dot_product_attention` leaves its fast CPU kernel for the math path when
dropout is on. Here a keep mask takes four 16-bit lanes from each 64-bit word of a fast generator seeded from
PyTorch's (so seeds, resume and per-rank streams work as before), and the attention path below keeps dropout
cheap.

The drop probability is quantised to 1/65536 (0.1 -> 6554/65536 = 0.100006) and the kept values are scaled by
the exact inverse of the keep probability, so the layer stays unbiased. GPUs, and compiled models (inductor
generates its own fused random numbers), use PyTorch's dropout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LANES = 65536  # values of a 16-bit lane


def uses_fast_mask(x: torch.Tensor, p: float, training: bool) -> bool:
    return training and p > 0 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask of `shape`, True with probability 1 - p (quantised to 1/65536), and the scale 1 / P(keep).

    The bits come from numpy's SFC64 generator (twice as fast as PyTorch's Mersenne Twister here: 1.2 vs 2.4 ms
    for the 3 M lanes of a block of attention), seeded by one draw of PyTorch's generator: seeds, resume and
    per-rank streams hold as for any other use of it."""
    n = math.prod(shape)
    dropped = round(p * LANES)
    seed = int(torch.randint(0, 2**63 - 1, ()))
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)  # uint64
    keep = words.view(np.int16)[:n] >= dropped - LANES // 2  # (numpy's compare: twice as fast as torch's here)
    return torch.from_numpy(keep).view(shape).to(device), LANES / (LANES - dropped)


class Dropout(nn.Dropout):
    """nn.Dropout, with the cheaper mask when training on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_fast_mask(x, self.p, self.training):
            return F.dropout(x, self.p, self.training, self.inplace)
        keep, scale = keep_mask(x.shape, self.p, x.device)
        return torch.where(keep, x * scale, 0)


def causal_attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, block: int = 256
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask), dropout p, @ v: (B, nh, T, hs) -> (B, nh, T, hs).

    Blocks of `block` queries each attend to the keys up to their last position only (about half the scores of
    the full (T, T) matrix that the math path computes), with the cheap mask above; forward and backward written
    out (CausalAttentionWithDropout), so that no pass over the scores is spent on autograd's copies and casts.
    In the dtype of q (bf16 under autocast). GPT-2 124M layer, bf16, T 1024, forward + backward, 2-core CPU: 45 ms,
    against 58 ms for the same blocks through autograd and 26 ms for the flash kernel without dropout (whose
    backward alone takes 22 ms: blocks of matmuls without dropout are no faster, so dropout 0 stays on it); on
    2026-12-06, with q, k, v made contiguous first and the mask compared in numpy (the same values bit for bit),
    34-36 ms against 38-40 before, the two alternating in one process."""
    return CausalAttentionWithDropout.apply(q, k, v, p, block)


class CausalAttentionWithDropout(torch.autograd.Function):
    """Keeps each block's softmax P and keep mask (both in q's dtype) for the backward pass, as autograd would,
    with no casts or boolean arithmetic on the scores (each costs 2-4x a same-dtype pass on a CPU). The backward is
    that of (P * keep) @ v * scale: dP = (dO v^T) * keep * scale, dS = P * (dP - rowsum(P * dP)) (PyTorch's softmax
    backward kernel, fp32 sums), dq = dS k / sqrt(hs), dk = dS^T q / sqrt(hs), dv = (P * keep)^T dO * scale."""

    @staticmethod
    def forward(ctx, q, k, v, p, block):
        T, hs = q.size(2), q.size(3)
        ctx.dtypes = q.dtype, k.dtype, v.dtype
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        with torch.autocast("cpu", enabled=False):
            # Contiguous (they arrive as views into the qkv projection): the blocks' slices multiply without copies.
            q = (q.to(dtype) * (1.0 / math.sqrt(hs))).contiguous()
            k, v = k.to(dtype).contiguous(), v.to(dtype).contiguous()
            above_diagonal = torch.full((block, block), float("-inf"), dtype=dtype, device=q.device).triu(1)
            out = torch.empty_like(q)
            saved = []
            for start in range(0, T, block):
                end = min(T, start + block)
                scores = q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)  # (B, nh, end - start, end)
                scores[..., start:end] += above_diagonal[: end - start, : end - start]
                probs = torch.softmax(scores, dim=-1)  # (fp32 sums inside for bf16)
                keep, scale = keep_mask(probs.shape, p, q.device)
                keep = keep.view(torch.uint8).to(dtype)  # 0 / 1
                out[:, :, start:end] = (probs * keep) @ v[:, :, :end]
                saved += [probs, keep]
            out.mul_(scale)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.block, ctx.scale = block, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *saved = ctx.saved_tensors  # q already scaled by 1 / sqrt(hs)
        T, hs, block, scale = q.size(2), q.size(3), ctx.block, ctx.scale
        wide = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(q.dtype).contiguous()
            grad_q = torch.empty_like(q)
            grad_k = torch.zeros(k.shape, dtype=wide, device=k.device)
            grad_v = torch.zeros(v.shape, dtype=wide, device=v.device)
            for i, start in enumerate(range(0, T, block)):
                end = min(T, start + block)
                probs, keep = saved[2 * i], saved[2 * i + 1]
                grad_v[:, :, :end] += (probs * keep).transpose(-2, -1) @ grad_out[:, :, start:end]
                grad_kept = (grad_out[:, :, start:end] @ v[:, :, :end].transpose(-2, -1)).mul_(keep)
                grad_scores = torch._softmax_backward_data(grad_kept, probs, -1, probs.dtype)
                grad_q[:, :, start:end] = grad_scores @ k[:, :, :end]
                grad_k[:, :, :end] += grad_scores.transpose(-2, -1) @ q[:, :, start:end]
            grad_q.mul_(scale / math.sqrt(hs))
            grad_k.mul_(scale)
            grad_v.mul_(scale)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None, None
