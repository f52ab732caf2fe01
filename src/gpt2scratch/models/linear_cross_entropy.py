"""The LM head and the cross-entropy loss in one autograd function, for training.

Written as `F.cross_entropy(F.linear(x, W).float(), targets)`, a training step keeps the logits, an fp32 copy of
them, the log-softmax output and its gradient, each a (tokens x 50,257) tensor (200 MB in fp32 for 1,024 tokens),
and runs log-softmax forward and backward as two separate passes over them. Here the gradient of the logits is
known in the forward pass (softmax - one-hot, over the number of counted targets), so it is written straight over
the logits, a block of rows at a time while that block's fp32 softmax is warm in the cache, and the backward pass
is two matmuls. Same arithmetic as the unfused path (logits in the matmul's precision, softmax in fp32, their
gradient rounded back to the matmul's precision), one tensor of logits instead of four. GPT-2 124M's head and
loss, 1,024 tokens, bf16, 2-core CPU (forward + backward): 414 ms unfused, 319 ms here, of which 234 ms are the
three matmuls and their casts; the `cpu` preset's (16 x 256 tokens, 128 wide, vocabulary 16,384): 247 -> 134 ms.
Each block's softmax is then taken in place in an fp32 block (for bf16 logits a widened copy, one buffer for every
block): one exp per logit where log_softmax then exp took two. On a 2-core EPYC with avx512_bf16, the loop alone
at the `cpu` preset's shape ~110 -> ~68 ms (GPT-2 124M's 1,024 x 50,257: ~68 -> ~43 ms), and the preset's whole
bf16 training step 433 -> 397 ms (medians of 8 rounds of 10 steps, alternating in one process).
"""

from __future__ import annotations

import torch

from gpt2scratch.config import IGNORE_INDEX
from gpt2scratch.models.cpu_matmul import mm, planned

BLOCK_ELEMENTS = 1 << 21  # logits per softmax block: 8 MB of fp32 (41 rows of GPT-2's vocabulary; measured best)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of softmax(x @ weight[:vocab_size].T) against targets (IGNORE_INDEX skipped), as
    `F.cross_entropy(F.linear(x, weight)[:, :vocab_size].float(), targets)` under the same autocast.

    x: (N, C); weight: (V, C), V >= vocab_size (a padded vocabulary: the extra rows get a zero gradient);
    targets: (N,). The matmuls run in the autocast dtype where autocast is on (bf16; fp16 is left to the unfused
    path, whose loss scaling its tiny gradients need), else in x's dtype."""
    return LinearCrossEntropy.apply(x, weight, targets, vocab_size, torch.is_grad_enabled())


def fusable(x: torch.Tensor) -> bool:
    """Whether linear_cross_entropy serves this input: on a CPU, not inside torch.compile (inductor fuses the
    plain version itself) and not under fp16 autocast. (GPUs keep the plain loss: there a block of 41 rows is a
    few microseconds of work per kernel launch, and the path is not measured on a GPU yet.)"""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, plans):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        input_dtype = x.dtype
        with torch.autocast(device, enabled=False):
            x, w = x.to(dtype), weight.to(dtype)
            ctx.plans = plans and planned(x)  # (training: the products as cpu_matmul plans them)
            logits = _mm(x, w.t(), ctx.plans)  # (N, V): overwritten by its own gradient below
            wide = torch.promote_types(dtype, torch.float32)  # the softmax's dtype
            counted = targets != IGNORE_INDEX
            share = counted.to(wide) / counted.sum()  # each counted row's weight in the mean
            safe_targets = targets.masked_fill(~counted, 0)
            loss = torch.zeros((), dtype=wide, device=x.device)
            step = max(1, BLOCK_ELEMENTS // vocab_size)
            rows = torch.arange(step, device=x.device)
            # bf16 logits: each block's softmax in place in one fp32 block, reused (fp32 logits: in place)
            wide_block = None if dtype == wide else logits.new_empty(min(step, logits.size(0)), vocab_size, dtype=wide)
            for start in range(0, logits.size(0), step):
                block, r = logits[start : start + step, :vocab_size], slice(start, start + step)
                target = rows[: block.size(0)], safe_targets[r]  # (row in the block, its target)
                if wide_block is None:
                    loss -= _softmax_in_place(block, target, share[r])
                    continue
                widened = wide_block[: block.size(0)]
                widened.copy_(block)
                loss -= _softmax_in_place(widened, target, share[r])
                block.copy_(widened)  # d loss / d logits, in the matmul's dtype (3x faster than mul's out=)
            logits[:, vocab_size:] = 0  # padding rows of the vocabulary: no gradient
        ctx.save_for_backward(logits, x, w)
        ctx.dtypes = input_dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_logits, x, w = ctx.saved_tensors
        input_dtype, weight_dtype = ctx.dtypes
        with torch.autocast(grad_logits.device.type, enabled=False):
            scale = grad_loss.to(x.dtype)  # 1, or 1 / accumulation steps: applied to the two small operands
            grad_x = (_mm(grad_logits, w, ctx.plans) * scale).to(input_dtype)
            grad_w = _mm(grad_logits.t(), x * scale, ctx.plans).to(weight_dtype)
        return grad_x, grad_w, None, None, None


def _softmax_in_place(block: torch.Tensor, target: tuple, share: torch.Tensor) -> torch.Tensor:
    """Overwrite a block of fp32 logits with d loss / d logits (softmax * share, minus share at the target);
    return sum(share * log_softmax at the target), which the loss subtracts. The `cpu` preset's fp32 loss
    loop (16 x 256 tokens, vocabulary 16,384) on a 2-core Xeon without bf16 instructions: 120 -> 68 ms alone,
    and `gpt2scratch train --preset cpu` ~670 -> ~645 ms a step (two runs each, alternating)."""
    block.sub_(block.amax(dim=-1, keepdim=True))
    picked = block[target]  # the targets' logits, less their row's largest
    block.exp_()
    total = block.sum(dim=-1)
    block.mul_((share / total)[:, None])
    block[target] -= share
    return ((picked - total.log()) * share).sum()


def _mm(a: torch.Tensor, b: torch.Tensor, plans: bool) -> torch.Tensor:
    return mm(a, b) if plans else a @ b
