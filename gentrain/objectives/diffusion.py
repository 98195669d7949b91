"""DDPM-style diffusion (Ho et al. 2020) on the variance-preserving schedule of diffusers'
DDPMScheduler: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, T) integer, the network is
called with t. Predictions: epsilon | v_prediction (Salimans & Ho 2022) | sample (x0), with
min-SNR-gamma weighting (Hang et al. 2023) and noise offset. The score view used by the SDE and
Langevin samplers is score(x_t) = -eps / sqrt(1 - abar_t) (Song et al. 2021).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.sampling import DIFFUSION_SAMPLERS, sample_ddim, sample_langevin, spaced_timesteps
from gentrain.maths.schedules import BETA_SCHEDULES, VPSchedule, min_snr_weight
from gentrain.objectives.denoising import DenoiserConfig, DenoisingObjective

PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass
class DiffusionConfig(DenoiserConfig):
    family: str = "diffusion"
    beta_schedule: str = "linear"    # linear | cosine | scaled_linear (diffusers DDPMScheduler betas)
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon" # epsilon | v_prediction | sample
    min_snr_gamma: float = 0.0       # 0 = off; 5 is the paper's choice
    noise_offset: float = 0.0        # images: per-channel constant added to the noise
    sampler: str = "ddpm"            # ddpm | ddim | vp_sde | langevin (the export: DDPMScheduler for ddpm, else DDIM)
    sample_steps: int = 100
    ddim_eta: float = 0.0
    langevin_steps_per_level: int = 20   # annealed Langevin is biased with few steps per level
    langevin_step_scale: float = 0.5     # step = scale * sigma_t^2

    def validate(self, cfg: Any) -> None:
        self.validate_net(cfg)
        for key, value, allowed in (("beta_schedule", self.beta_schedule, tuple(BETA_SCHEDULES)),
                                    ("prediction_type", self.prediction_type, PREDICTIONS),
                                    ("sampler", self.sampler, tuple(DIFFUSION_SAMPLERS))):
            if value not in allowed:
                raise GentrainError(f"config key 'model.{key}': {value!r} is not allowed; choose one of {', '.join(allowed)}")
        if not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise GentrainError(f"config key 'model.sample_steps': {self.sample_steps} must be in [1, model.num_train_timesteps]")


class DiffusionObjective(DenoisingObjective):
    """Noise-prediction regression on the VP schedule; DDPM / DDIM / VP-SDE / Langevin sampling."""

    Config = DiffusionConfig
    net_name = "denoiser"
    ema_nets = ("denoiser",)

    def __init__(self, net: torch.nn.Module, m: DiffusionConfig, **kw: Any):
        super().__init__(net, m, **kw)
        self.schedule = VPSchedule(m.beta_schedule, m.num_train_timesteps)

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x0, cond = self.inputs(batch)
        eps = self.rng.randn_like(x0)
        if self.m.noise_offset and x0.dim() == 4:  # Guttenberg 2023: shifts the mean brightness
            eps = eps + self.m.noise_offset * self.rng.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device)
        t = self.rng.randint(0, self.schedule.T, x0.shape[0], device=x0.device)
        pred = self.nets[self.net_name](self.schedule.add_noise(x0, eps, t), t, **cond)
        target = self.schedule.target(self.m.prediction_type, x0, eps, t)
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
        if self.m.min_snr_gamma:
            per_sample = per_sample * min_snr_weight(self.schedule.snr(t), self.m.min_snr_gamma,
                                                     self.m.prediction_type).float()
        return self.batch_mean(per_sample), {}

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
               timesteps: Any = None, decode: bool = True, **kw: Any) -> Tensor:
        """n samples (cond as in flow). `timesteps` (e.g. an exported pipeline scheduler's) replace the
        evenly spaced ones; guidance mixes the raw predictions, then converts to eps, as diffusers does."""
        x, net = self.start(n, cond, guidance_scale, generator)

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.schedule.eps_from(self.m.prediction_type, net(x, t).float(), x, t)

        ts = [int(t) for t in timesteps] if timesteps is not None else spaced_timesteps(
            self.schedule.T, steps or self.m.sample_steps)
        name, ac = sampler or self.m.sampler, self.schedule.alphas_cumprod
        if name == "ddim":
            x = sample_ddim(eps_fn, x, ac, ts, eta=self.m.ddim_eta, generator=generator)
        elif name == "langevin":
            x = sample_langevin(eps_fn, x, ac, ts, self.m.langevin_steps_per_level, self.m.langevin_step_scale,
                                generator=generator)
        else:
            x = DIFFUSION_SAMPLERS[name](eps_fn, x, ac, ts, generator=generator)
        return self.finish(x, decode)

    def export_scheduler(self) -> Any:
        """DDPMScheduler (sampler ddpm) or DDIMScheduler, "trailing" spacing so the first step starts from
        pure noise; clip_sample=False and steps_offset=1 set explicitly (pipelines rewrite them otherwise)."""
        from diffusers import DDIMScheduler, DDPMScheduler

        common = dict(num_train_timesteps=self.schedule.T, beta_schedule=BETA_SCHEDULES[self.m.beta_schedule],
                      prediction_type=self.m.prediction_type, clip_sample=False, steps_offset=1,
                      timestep_spacing="trailing")
        if self.m.sampler == "ddpm":
            return DDPMScheduler(variance_type="fixed_small", **common)
        return DDIMScheduler(set_alpha_to_one=True, **common)
