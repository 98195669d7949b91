"""The linear (rectified-flow) path between data and noise, and the training-time draw of t.

Convention (diffusers'): x_t = (1 - t) x_data + t noise; the target velocity is noise - x_data.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gentrain.maths.rng import BatchRNG


class LinearPath:
    """x_t = (1 - t) x0 + t x1 with x0 = data, x1 = noise; conversions between parameterisations."""

    @staticmethod
    def _b(t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(-1, *([1] * (x.dim() - 1)))

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t = self._b(t, x0)
        return (1 - t) * x0 + t * noise

    def velocity(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def x0_from_velocity(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        return xt - self._b(t, xt) * v

    def noise_from_velocity(self, xt: Tensor, v: Tensor, t: Tensor) -> Tensor:
        return xt + (1 - self._b(t, xt)) * v


def sample_time(n: int, kind: str, device: torch.device, rng: BatchRNG | None = None) -> Tensor:
    """t in (0, 1): uniform, or logit-normal (Esser et al. 2024, SD3) which favours mid t."""
    rng = rng or BatchRNG()
    if kind == "logit_normal":
        return torch.sigmoid(rng.randn(n, device=device))
    return rng.rand(n, device=device)
