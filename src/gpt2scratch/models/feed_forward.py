"""The position-wise MLP of a GPT-2 block: C -> 4C -> GELU -> C."""

import torch
from torch import nn

from gpt2scratch.config import GPTConfig
from gpt2scratch.models.dropout import Dropout
from gpt2scratch.models.gelu import GELU
from gpt2scratch.models.linear import Linear


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.emb_dim, 4 * config.emb_dim)
        self.act = GELU()
        self.c_proj = Linear(4 * config.emb_dim, config.emb_dim)  # residual projection: scaled init in gpt.py
        self.dropout = Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))
