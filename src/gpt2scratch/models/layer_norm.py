"""LayerNorm with a learned scale and shift; eps 1e-5 as in GPT-2 (parity-critical)."""

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
