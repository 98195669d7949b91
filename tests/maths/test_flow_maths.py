"""Flow matching maths on CPU: path conversions round-trip; samplers on analytic velocity fields."""
import math

import pytest
import torch

from gentrain.objectives import BatchRNG
from gentrain.maths.paths import LinearPath, sample_time
from gentrain.maths.sampling import FLOW_SAMPLERS, flow_sigmas


def test_linear_path_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    t = torch.rand(64, generator=g)
    path = LinearPath()
    xt = path.interpolate(x0, noise, t)
    v = path.velocity(x0, noise)
    torch.testing.assert_close(path.x0_from_velocity(xt, v, t), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(path.noise_from_velocity(xt, v, t), noise, rtol=0, atol=1e-5)
    # diffusers convention: t=0 is data, t=1 is noise
    torch.testing.assert_close(path.interpolate(x0, noise, torch.zeros(64)), x0)
    torch.testing.assert_close(path.interpolate(x0, noise, torch.ones(64)), noise)


def point_mass_velocity(c):
    # x_t = (1-t) c + t n  =>  n = (x - (1-t) c) / t  =>  v = n - c = (x - c) / t
    return lambda x, t: (x - c) / t[:, None]


def two_point_velocity(a, b):
    """Exact marginal velocity for data uniform on {a, b} and standard normal noise."""
    def v(x, t):
        tt = t[:, None]
        logits = torch.stack([-((x - (1 - tt) * p) ** 2).sum(1) / (2 * tt[:, 0] ** 2) for p in (a, b)], 1)
        w = torch.softmax(logits, 1)                         # posterior over the two points
        x0_hat = w[:, :1] * a + w[:, 1:] * b
        return (x - x0_hat) / tt
    return v


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_samplers_land_on_a_point_mass(name):
    c = torch.tensor([1.5, -0.5])
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    out = FLOW_SAMPLERS[name](point_mass_velocity(c), x, flow_sigmas(10))
    assert (out - c).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_samplers_split_mass_between_two_points(name):
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2))
    sigmas = torch.cat([torch.linspace(1.0, 0.02, 100), torch.zeros(1)])
    out = FLOW_SAMPLERS[name](two_point_velocity(a, b), x, sigmas)
    da, db = (out - a).norm(dim=1), (out - b).norm(dim=1)
    assert torch.minimum(da, db).max() < 0.05           # every sample lands on a data point
    frac_a = (da < db).float().mean().item()
    assert abs(frac_a - 0.5) < 0.05                     # with the right mass on each


def test_euler_is_first_order_and_heun_second_order_on_linear_ode():
    # dx/dt = x on t in [1, 0] (integrating backwards): exact x(0) = x(1) * e^{-1}
    x1 = torch.ones(1, 1)
    errs = {}
    for name in ("euler", "heun"):
        e = []
        for steps in (10, 20):
            out = FLOW_SAMPLERS[name](lambda x, t: x, x1, flow_sigmas(steps))
            e.append(abs(out.item() - math.exp(-1)))
        errs[name] = e[0] / e[1]
    assert 1.7 < errs["euler"] < 2.3      # halving the step halves the error
    assert errs["heun"] > 2.3             # faster convergence than first order


def test_logit_normal_times_concentrate_mid_range():
    rng = BatchRNG(generator=torch.Generator().manual_seed(0))
    t = sample_time(20000, "logit_normal", torch.device("cpu"), rng)
    u = sample_time(20000, "uniform", torch.device("cpu"), rng)
    assert 0 < t.min() and t.max() < 1
    mid = lambda s: ((s > 0.25) & (s < 0.75)).float().mean()
    assert mid(t) > mid(u) + 0.1
