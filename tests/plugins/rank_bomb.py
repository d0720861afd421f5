"""A user model for the DDP failure test: it raises in the forward pass of one DDP rank."""

from __future__ import annotations

import torch
from torch import nn


class FailOnRank(nn.Module):
    def __init__(self, rank: int = 1, in_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.rank = rank
        self.net = nn.Linear(in_features, num_classes)

    def forward(self, x):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() == self.rank:
                raise RuntimeError(f"boom on rank {self.rank}")
        return self.net(x.flatten(1))
