"""SD3-style flow timesteps (gentrain/maths/flow_timesteps.py) against diffusers.training_utils: the
same draws bit for bit through BatchRNG, the same split across ranks, the scheduler's shifted sigmas,
and the loss weighting."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from gentrain.maths.flow_timesteps import (WEIGHTING_SCHEMES, SchedulerSigmas, loss_weighting, sample_density,
                                           weighted_flow_loss)
from gentrain.maths.rng import BatchRNG

ARGS = dict(logit_mean=0.0, logit_std=1.0, mode_scale=1.29)   # train_dreambooth_sd3.py's defaults


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_draws_are_diffusers_own_and_split_across_ranks_alike(scheme):
    ref = compute_density_for_timestep_sampling(scheme, 8, generator=torch.Generator().manual_seed(3), **ARGS)
    mine = sample_density(BatchRNG(generator=torch.Generator().manual_seed(3)), 8, scheme, **ARGS)
    assert torch.equal(mine, ref)
    halves = [sample_density(BatchRNG(r, 2, torch.Generator().manual_seed(3)), 4, scheme, **ARGS) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), ref)        # 2 ranks at 4 draw what 1 rank draws at 8
    assert ((ref >= 0) & (ref <= 1)).all()


def test_the_distributions_are_the_published_ones():
    n, g = 200_000, torch.Generator().manual_seed(0)
    u = sample_density(BatchRNG(generator=g), n, "logit_normal", 0.0, 1.0, 1.29)
    z = torch.logit(u.double())
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01     # sigmoid of N(0, 1)
    shifted = torch.logit(sample_density(BatchRNG(generator=g), n, "logit_normal", 0.5, 2.0, 1.29).double())
    assert abs(float(shifted.mean()) - 0.5) < 0.02 and abs(float(shifted.std()) - 2) < 0.02
    flat = sample_density(BatchRNG(generator=g), n, "cosmap", 0.0, 1.0, 1.29)
    assert abs(float(flat.mean()) - 0.5) < 0.005 and abs(float(flat.var()) - 1 / 12) < 0.002   # uniform
    # mode: u = 1 - v - s (cos^2(pi v / 2) - 1 + v), v uniform: its mean is 1/2 - s (1/2 - 1 + 1/2) = 1/2
    # (E cos^2(pi v/2) = 1/2) and P(u > 1/2) = P(v < 1/2) since u decreases in v and u(1/2) = 1/2
    mode = sample_density(BatchRNG(generator=g), n, "mode", 0.0, 1.0, 1.29)
    assert abs(float(mode.mean()) - 0.5) < 0.005 and abs(float((mode > 0.5).float().mean()) - 0.5) < 0.005
    assert float(mode.var()) < 1 / 12 - 0.01                                   # mass pulled to the middle


def test_sigmas_are_the_shifted_grid_of_a_fresh_scheduler():
    pipe_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe_scheduler.set_timesteps(4)                 # a preview has rewritten the pipeline's scheduler
    grid = SchedulerSigmas(pipe_scheduler.config)
    u = torch.tensor([0.0, 0.25, 0.5, 0.9999, 1.0])
    sigma, timestep = grid(u)
    index = torch.tensor([0, 250, 500, 999, 999])
    s = (1000 - index).double() / 1000                                         # unshifted sigma at the index
    expected = 3 * s / (1 + 2 * s)                                             # shift 3: s' = shift s / (1 + (shift-1) s)
    torch.testing.assert_close(sigma.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(timestep, sigma * 1000, rtol=0, atol=1e-3)
    # what train_dreambooth_sd3.py reads off its scheduler copy
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    idx = (u[:4] * 1000).long()
    assert torch.equal(sigma[:4], ref.sigmas[idx]) and torch.equal(timestep[:4], ref.timesteps[idx])


def test_weighting_and_loss():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for scheme in WEIGHTING_SCHEMES:
        assert torch.equal(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))
    torch.testing.assert_close(loss_weighting("sigma_sqrt", sigmas), sigmas ** -2)
    torch.testing.assert_close(loss_weighting("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))
    assert torch.equal(loss_weighting("logit_normal", sigmas), torch.ones(3))
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    w = torch.tensor([1.0, 2.0, 0.5])
    per_sample = ((pred - target) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(weighted_flow_loss(pred, target, w), (w * per_sample).mean())
    torch.testing.assert_close(weighted_flow_loss(pred, target, torch.ones(3)), torch.nn.functional.mse_loss(pred, target))
