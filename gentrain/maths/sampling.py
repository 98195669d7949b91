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


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_euler_maruyama(velocity: Velocity, x: Tensor, sigmas: Tensor, noise_scale: float = 1.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """SDE with the flow's marginals: dx = [v - (g_t^2 / 2) score] dt + g_t dW, dt < 0, g_t = noise_scale * t.

    The seed's formulation with noise at t=0, mapped to gentrain's convention (noise at t=1). For the
    linear path score(x, t) = -noise/t = -(x + (1 - t) v) / t. Each step is the ODE step plus a
    Langevin step of size g^2 |dt| on p_t; the last step (to t=0) is the plain ODE step.
    """
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t = _t(s, x)
        v = velocity(x, t)
        dt = s_next - s
        g = noise_scale * s
        if s_next > 0:
            score = -(x + (1 - s) * v) / s
            x = x + (v - 0.5 * g ** 2 * score) * dt + g * dt.abs().sqrt() * _noise_like(x, generator)
        else:  # the last step is the plain ODE step (no noise, no Langevin correction)
            x = x + v * dt
    return x


FLOW_SAMPLERS["euler_maruyama"] = sample_euler_maruyama

# ---- variance-preserving diffusion (DDPM) -------------------------------------------------------
# x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at integer timesteps t in [0, T); the network is
# called with t itself (diffusers' convention); `eps_fn(x, t (B,)) -> eps`.
Eps = Callable[[Tensor, Tensor], Tensor]


def _ab(alphas_cumprod: Tensor, t: int, x: Tensor) -> Tensor:
    return alphas_cumprod[t].to(x.device, torch.float64) if t >= 0 else torch.ones((), dtype=torch.float64, device=x.device)


def _tt(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddpm(eps_fn: Eps, x: Tensor, alphas_cumprod: Tensor, timesteps: list[int],
                generator: torch.Generator | None = None) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), on any decreasing subset of timesteps:
    x_prev ~ q(x_prev | x_t, x0_hat) with the effective beta = 1 - abar_t / abar_prev."""
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab, ab_prev = _ab(alphas_cumprod, t, x), _ab(alphas_cumprod, prev, x)
        beta = 1 - ab / ab_prev
        eps = eps_fn(x, _tt(t, x)).double()
        xd = x.double()
        x0 = (xd - (1 - ab).sqrt() * eps) / ab.sqrt()
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * xd
        var = beta * (1 - ab_prev) / (1 - ab)
        xd = mean + (var.sqrt() * _noise_like(x, generator).double() if prev >= 0 else 0)
        x = xd.to(x.dtype)
    return x


@torch.no_grad()
def sample_ddim(eps_fn: Eps, x: Tensor, alphas_cumprod: Tensor, timesteps: list[int], eta: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic for eta=0, DDPM-like for eta=1."""
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab, ab_prev = _ab(alphas_cumprod, t, x), _ab(alphas_cumprod, prev, x)
        eps = eps_fn(x, _tt(t, x)).double()
        xd = x.double()
        x0 = (xd - (1 - ab).sqrt() * eps) / ab.sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        xd = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if prev >= 0 and eta > 0:
            xd = xd + sigma * _noise_like(x, generator).double()
        x = xd.to(x.dtype)
    return x


@torch.no_grad()
def sample_vp_sde(eps_fn: Eps, x: Tensor, alphas_cumprod: Tensor, timesteps: list[int],
                  generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama on the reverse VP-SDE (Song et al. 2021, eq. 6 with f = -beta x / 2, g = sqrt(beta)):
    x <- x + (beta x / 2 + beta * score) + sqrt(beta) z, score = -eps / sigma_t; the last step to t=0
    returns the model's x0 estimate (denoising, as in the paper's final step)."""
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab, ab_prev = _ab(alphas_cumprod, t, x), _ab(alphas_cumprod, prev, x)
        eps = eps_fn(x, _tt(t, x)).double()
        xd = x.double()
        if prev < 0:
            x = ((xd - (1 - ab).sqrt() * eps) / ab.sqrt()).to(x.dtype)
            break
        beta = 1 - ab / ab_prev
        score = -eps / (1 - ab).sqrt()
        xd = xd + 0.5 * beta * xd + beta * score + beta.sqrt() * _noise_like(x, generator).double()
        x = xd.to(x.dtype)
    return x


@torch.no_grad()
def sample_langevin(eps_fn: Eps, x: Tensor, alphas_cumprod: Tensor, timesteps: list[int], steps_per_level: int = 5,
                    step_scale: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the noise levels of
    `timesteps` with the learned score -eps/sigma_t; step size alpha_t = step_scale * sigma_t^2
    (their eps * sigma_i^2 / sigma_L^2). Ends with the x0 estimate at the last level."""
    for t in timesteps:
        ab = _ab(alphas_cumprod, t, x)
        sigma = (1 - ab).sqrt()
        alpha = step_scale * sigma ** 2
        for _ in range(steps_per_level):
            score = -eps_fn(x, _tt(t, x)).double() / sigma
            x = (x.double() + 0.5 * alpha * score + alpha.sqrt() * _noise_like(x, generator).double()).to(x.dtype)
    t = timesteps[-1]
    ab = _ab(alphas_cumprod, t, x)
    return ((x.double() - (1 - ab).sqrt() * eps_fn(x, _tt(t, x)).double()) / ab.sqrt()).to(x.dtype)


def spaced_timesteps(num_train: int, steps: int) -> list[int]:
    """`steps` decreasing timesteps from T-1 to 0, evenly spaced ("trailing" spacing, so the first
    step starts from pure noise)."""
    return sorted({int(round(v)) for v in torch.linspace(num_train - 1, 0, steps).tolist()}, reverse=True)


DIFFUSION_SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "vp_sde": sample_vp_sde, "langevin": sample_langevin}
