"""Conditional flow matching / rectified flow with the linear path (Lipman et al. 2023; Liu et al. 2023).

Convention (diffusers', shared by every gentrain family so exports sample correctly):
    x_t = (1 - t) * x_data + t * noise,   target velocity v = noise - x_data,
the network is called with ``timestep = t * 1000`` and sampling runs from t = 1 (noise) to t = 0.
The seed (and the flow_matching library) put noise at t = 0 and data at t = 1 instead; the two
are the same model under t -> 1 - t and v -> -v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.paths import LinearPath, sample_time
from gentrain.maths.sampling import FLOW_SAMPLERS, flow_sigmas
from gentrain.objectives.denoising import DenoiserConfig, DenoisingObjective


@dataclass
class FlowConfig(DenoiserConfig):
    family: str = "flow"
    time_sampling: str = "uniform"   # uniform | logit_normal (SD3's, mean 0 std 1)
    sampler: str = "euler"           # euler | heun | euler_maruyama (SDE with the same marginals)
    sde_noise_scale: float = 1.0     # euler_maruyama: g_t = sde_noise_scale * t
    sample_steps: int = 50

    def validate(self, cfg: Any) -> None:
        self.validate_net(cfg)
        for key, value, allowed in (("time_sampling", self.time_sampling, ("uniform", "logit_normal")),
                                    ("sampler", self.sampler, tuple(FLOW_SAMPLERS))):
            if value not in allowed:
                raise GentrainError(f"config key 'model.{key}': {value!r} is not allowed; choose one of {', '.join(allowed)}")
        if self.sample_steps < 1:
            raise GentrainError("config key 'model.sample_steps' must be >= 1")


class FlowMatchingObjective(DenoisingObjective):
    """Velocity regression on the linear path; Euler/Heun ODE or Euler-Maruyama SDE sampling from t=1 to t=0."""

    Config = FlowConfig
    net_name = "velocity"
    ema_nets = ("velocity",)

    def __init__(self, net: torch.nn.Module, m: FlowConfig, **kw: Any):
        super().__init__(net, m, **kw)
        self.path = LinearPath()

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        x0, cond = self.inputs(batch)
        noise = self.rng.randn_like(x0)
        t = sample_time(x0.shape[0], self.m.time_sampling, x0.device, self.rng)     # (B,)
        xt = self.path.interpolate(x0, noise, t)
        pred = self.nets[self.net_name](xt, t * 1000, **cond)
        if self.sample_weights is None:
            return F.mse_loss(pred.float(), self.path.velocity(x0, noise).float()), {}
        return self.batch_mean((pred.float() - self.path.velocity(x0, noise).float()).pow(2).flatten(1).mean(1)), {}

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               steps: int | None = None, sampler: str | None = None, guidance_scale: float | None = None,
               sigmas: Tensor | None = None, timesteps: Tensor | None = None, decode: bool = True,
               **kw: Any) -> Tensor:
        """n samples; text models take cond={"prompts": [n strings]}, class models cond={"labels": [n ids]}.
        `sigmas`/`timesteps` (e.g. from an exported pipeline's scheduler) replace the uniform grid and the
        network's t * 1000; decode=False returns latents."""
        x, net = self.start(n, cond, guidance_scale, generator)
        sigmas = flow_sigmas(steps or self.m.sample_steps, x.device) if sigmas is None else sigmas.to(x.device)
        lookup = {float(s): float(t) for s, t in zip(sigmas.to(x.dtype), timesteps)} if timesteps is not None else {}

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return net(x, torch.full_like(t, lookup[float(t[0])]) if lookup else t * 1000)

        name = sampler or self.m.sampler
        if name == "euler_maruyama":
            x = FLOW_SAMPLERS[name](velocity, x, sigmas, self.m.sde_noise_scale, generator=generator)
        else:
            x = FLOW_SAMPLERS[name](velocity, x, sigmas)
        return self.finish(x, decode)

    def export_scheduler(self) -> Any:
        """Flow sampling through DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction, order 1) = Euler
        on its grid; steps_offset set, or the pipeline rewrites the config."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True,
                                           prediction_type="flow_prediction", final_sigmas_type="zero",
                                           solver_order=1, steps_offset=1)
