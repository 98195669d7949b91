"""The variance-preserving noise schedule of diffusers' DDPMScheduler as a maths object, and the
Min-SNR-gamma loss weight (Hang et al. 2023)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}


class VPSchedule:
    """The VP schedule as a maths object: noising and eps <-> x0 <-> v conversions (all (B, ...))."""

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000, scheduler_config: Any = None):
        """gentrain's named betas, or a pipeline scheduler's own (its config: betas, beta range, T)."""
        from diffusers import DDPMScheduler

        sched = (DDPMScheduler.from_config(scheduler_config) if scheduler_config is not None else
                 DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULES[beta_schedule]))
        self.alphas_cumprod = sched.alphas_cumprod.double()                       # (T,)
        self.T = int(sched.config.num_train_timesteps)

    def coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        ab = self.alphas_cumprod.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return ab.sqrt(), (1 - ab).sqrt()                                           # alpha_t, sigma_t

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def target(self, prediction_type: str, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, x0)
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]

    def eps_from(self, prediction_type: str, pred: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, xt)
        if prediction_type == "epsilon":
            return pred
        if prediction_type == "sample":
            return (xt - a * pred) / s
        return s * xt + a * pred                                                    # from v

    def x0_from(self, prediction_type: str, pred: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        a, s = self.coefficients(t, xt)
        return (xt - s * self.eps_from(prediction_type, pred, xt, t)) / a

    def snr(self, t: Tensor) -> Tensor:
        ab = self.alphas_cumprod.to(t.device)[t]
        return ab / (1 - ab)


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weight of Min-SNR-gamma for a loss on the given target."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
