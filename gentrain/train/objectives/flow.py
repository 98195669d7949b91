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

from ...errors import GentrainError
from ..sampling import FLOW_SAMPLERS, flow_sigmas
from .base import Objective


@dataclass
class FlowConfig:
    family: str = "flow"
    net: str = "mlp"                 # mlp: 2-D toy data
    hidden: int = 256
    depth: int = 4
    time_sampling: str = "uniform"   # uniform | logit_normal (SD3's, mean 0 std 1)
    sampler: str = "euler"           # euler | heun | euler_maruyama (SDE with the same marginals)
    sde_noise_scale: float = 1.0     # euler_maruyama: g_t = sde_noise_scale * t
    sample_steps: int = 50

    def validate(self, cfg: Any) -> None:
        for key, value, allowed in (("net", self.net, ("mlp",)),
                                    ("time_sampling", self.time_sampling, ("uniform", "logit_normal")),
                                    ("sampler", self.sampler, tuple(FLOW_SAMPLERS))):
            if value not in allowed:
                raise GentrainError(f"config key 'model.{key}': {value!r} is not allowed; choose one of {', '.join(allowed)}")
        if self.net == "mlp" and cfg.data.source != "toy2d":
            raise GentrainError(f"config key 'model.net': 'mlp' is for 2-D toy data, but data.source is {cfg.data.source!r}")
        if self.sample_steps < 1 or self.hidden < 1 or self.depth < 1:
            raise GentrainError("config keys 'model.sample_steps', 'model.hidden', 'model.depth' must be >= 1")


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


def sample_time(n: int, kind: str, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """t in (0, 1): uniform, or logit-normal (Esser et al. 2024, SD3) which favours mid t."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))
    return torch.rand(n, device=device, generator=generator)


class FlowMatchingObjective(Objective):
    """Velocity regression on the linear path; Euler/Heun ODE sampling from t=1 to t=0."""

    Config = FlowConfig
    ema_nets = ("velocity",)

    def __init__(self, net: torch.nn.Module, *, data_key: str = "x", sample_shape: tuple[int, ...] = (2,),
                 time_sampling: str = "uniform", sampler: str = "euler", sample_steps: int = 50,
                 preview_count: int = 16, sde_noise_scale: float = 1.0):
        self.nets = {"velocity": net}
        self.path = LinearPath()
        self.data_key, self.sample_shape = data_key, sample_shape
        self.time_sampling, self.sampler, self.sample_steps = time_sampling, sampler, sample_steps
        self.preview_count, self.sde_noise_scale = preview_count, sde_noise_scale

    @classmethod
    def from_config(cls, cfg: Any) -> "FlowMatchingObjective":
        from ...modeling.mlp import TimeConditionedMLP

        m: FlowConfig = cfg.model
        net = TimeConditionedMLP(dim=2, hidden=m.hidden, depth=m.depth)
        return cls(net, time_sampling=m.time_sampling, sampler=m.sampler, sample_steps=m.sample_steps,
                   preview_count=4000, sde_noise_scale=m.sde_noise_scale)  # a 2-D density plot wants many points

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        x0 = batch[self.data_key]                                          # (B, ...)
        noise = torch.randn_like(x0)
        t = sample_time(x0.shape[0], self.time_sampling, x0.device)        # (B,)
        xt = self.path.interpolate(x0, noise, t)
        pred = self.nets["velocity"](xt, t * 1000)
        loss = F.mse_loss(pred.float(), self.path.velocity(x0, noise).float())
        return loss, {}

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               steps: int | None = None, sampler: str | None = None, **kw: Any) -> Tensor:
        net = self.nets["velocity"]
        device = next(net.parameters()).device
        x = torch.randn((n, *self.sample_shape), generator=generator, device=device)
        sigmas = flow_sigmas(steps or self.sample_steps, device)
        name = sampler or self.sampler
        velocity = lambda x, t: net(x, t * 1000)  # noqa: E731
        if name == "euler_maruyama":
            return FLOW_SAMPLERS[name](velocity, x, sigmas, self.sde_noise_scale, generator=generator)
        return FLOW_SAMPLERS[name](velocity, x, sigmas)
