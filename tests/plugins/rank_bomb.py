"""A user model for the DDP failure tests: in the forward pass of one DDP rank it raises, or the process dies."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn


class FailOnRank(nn.Module):
    def __init__(self, rank: int = 1, how: str = "raise", in_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.rank, self.how = rank, how
        self.net = nn.Linear(in_features, num_classes)

    def forward(self, x):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() == self.rank:
                if self.how == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"boom on rank {self.rank}")
        return self.net(x.flatten(1))
