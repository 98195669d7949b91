"""Small MLPs for 2-D toy data (the seed's velocity / score / VAE nets)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps in [0, 1000] -> (B, dim), as in DDPM/diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeConditionedMLP(nn.Module):
    """f(x, timestep) for x of shape (B, dim): velocity, noise or score on 2-D toys."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        h = self.inp(x) + self.time_mlp(timestep_embedding(timestep, self.time_dim))  # (B, hidden)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
