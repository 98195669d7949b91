"""The training step of a flow pipeline whose scheduler is a FlowMatchEulerDiscreteScheduler (SD3, SD3.5), as
diffusers' SD3 scripts take it (maths/flow_timesteps.py): u from the weighting scheme's density, the
scheduler's shifted sigma and timestep at index (u * 1000), x_t = (1 - sigma) x0 + sigma noise, the velocity
noise - x0 as target, the scheme's loss weighting. The network is called with the scheduler's timestep
(sigma * 1000), as the pipeline calls it when sampling.

The scripts' --precondition_outputs (default 1) regresses x0 = x_t - sigma v instead, which is this loss
weighted by sigma^2; the velocity loss here is the SD3 paper's (Esser et al. 2024, eq. 17 with w = 1 for
logit-normal sampling) and the one the issue asks for.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.flow_timesteps import (WEIGHTING_SCHEMES, SchedulerSigmas, loss_weighting, sample_density,
                                           weighted_flow_loss)


def check_weighting(m: Any) -> None:
    """One line for a weighting key out of range (config keys model.weighting_scheme, logit_std, mode_scale)."""
    if m.weighting_scheme not in WEIGHTING_SCHEMES:
        raise GentrainError(f"config key 'model.weighting_scheme': {m.weighting_scheme!r} is not allowed; choose one "
                            f"of {', '.join(WEIGHTING_SCHEMES)}")
    if not m.logit_std > 0:
        raise GentrainError(f"config key 'model.logit_std': {m.logit_std} must be > 0")
    if not -1 <= m.mode_scale <= 1.75:   # u(v) stays monotone on [0, 1] for s in [-1, 2 / (pi - 2)] (Esser et al. 2024)
        raise GentrainError(f"config key 'model.mode_scale': {m.mode_scale} must be in [-1, 1.75]")


class ScheduledFlowLoss:
    """Mixin before a FlowMatchingObjective: where `sigma_grid` is set (a FlowMatchEulerDiscreteScheduler's
    training grid, set by the fine-tune), the SD3 scripts' step; else the flow family's own."""

    sigma_grid: SchedulerSigmas | None = None

    def use_scheduler_sigmas(self, scheduler_config: Any) -> None:
        self.sigma_grid = SchedulerSigmas(scheduler_config)

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        if self.sigma_grid is None:
            return super().loss(phase, batch)
        m = self.m
        x0, cond = self.inputs(batch)
        noise = self.rng.randn_like(x0)
        u = sample_density(self.rng, x0.shape[0], m.weighting_scheme, m.logit_mean, m.logit_std, m.mode_scale,
                           device=x0.device)
        sigma, timestep = self.sigma_grid(u)
        xt = self.path.interpolate(x0, noise, sigma)
        pred = self.nets[self.net_name](xt, timestep, **cond)
        target = self.path.velocity(x0, noise)
        weighting = loss_weighting(m.weighting_scheme, sigma)
        return self.batch_mean(weighted_flow_loss(pred, target, weighting, reduce=False)), {}
