"""GELU with the tanh approximation, as GPT-2 was trained (HF's `gelu_new`); parity-critical, not exact erf."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """The formula from the GPT-2 code, written out: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GELU(nn.Module):
    """The same function through PyTorch's fused kernel (equal to the formula to fp32 rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")
