"""Samplers: free functions over a callable, outside the training loop (k-diffusion style).

Time convention everywhere in gentrain (diffusers'): x_t = (1 - t) x_data + t noise, so sampling
integrates from t = 1 (noise) down to t = 0 (data). ``sigmas`` is the decreasing grid of t values
ending at 0; a velocity model returns v = dx_t/dt = noise - x_data.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> v (B, ...)


def flow_sigmas(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform grid 1 -> 0 with steps+1 points."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)


def _t(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.expand(x.shape[0]).to(x.dtype)


@torch.no_grad()
def sample_euler(velocity: Velocity, x: Tensor, sigmas: Tensor) -> Tensor:
    """Explicit Euler on dx/dt = v(x, t) from sigmas[0] to sigmas[-1]."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * velocity(x, _t(s, x))
    return x


@torch.no_grad()
def sample_heun(velocity: Velocity, x: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's 2nd-order method (Algorithm 1, Karras et al. 2022); Euler on the last step to t=0."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity(x, _t(s, x))
        x_euler = x + (s_next - s) * v
        if s_next == 0:
            x = x_euler
        else:
            x = x + (s_next - s) * 0.5 * (v + velocity(x_euler, _t(s_next, x)))
    return x


FLOW_SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
