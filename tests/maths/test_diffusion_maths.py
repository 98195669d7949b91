"""VP diffusion maths on CPU: conversions round-trip, Min-SNR weights, every sampler on exact
noise predictions for a point mass and a two-point dataset; the flow SDE sampler likewise."""
import pytest
import torch

from gentrain.maths.schedules import VPSchedule, min_snr_weight
from gentrain.maths.sampling import (DIFFUSION_SAMPLERS, flow_sigmas, sample_ddim, sample_euler_maruyama,
                                     sample_langevin, spaced_timesteps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_conversions_round_trip(schedule, prediction):
    vp = VPSchedule(schedule)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.randint(0, 990, (64,), generator=g)
    xt = vp.add_noise(x0, eps, t)
    pred = vp.target(prediction, x0, eps, t)
    torch.testing.assert_close(vp.eps_from(prediction, pred, xt, t), eps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vp.x0_from(prediction, pred, xt, t), x0, rtol=1e-3, atol=1e-3)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def exact_eps(points, ac):
    """The exact eps-prediction (posterior mean of the noise) for data uniform on `points`."""
    def eps_fn(x, t):
        ab = ac[t].to(x.dtype)[:, None]
        logits = torch.stack([-((x - ab.sqrt() * p) ** 2).sum(1) / (2 * (1 - ab[:, 0])) for p in points], 1)
        w = torch.softmax(logits, 1)
        x0 = sum(w[:, i:i + 1] * p for i, p in enumerate(points))
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return eps_fn


def run(name, eps_fn, x, ac, ts, g):
    if name == "ddim":
        return sample_ddim(eps_fn, x, ac, ts, eta=0.0, generator=g)
    if name == "langevin":
        return sample_langevin(eps_fn, x, ac, ts, steps_per_level=3, step_scale=0.1, generator=g)
    return DIFFUSION_SAMPLERS[name](eps_fn, x, ac, ts, generator=g)


@pytest.mark.parametrize("name", sorted(DIFFUSION_SAMPLERS))
def test_samplers_land_on_a_point_mass(name):
    ac = VPSchedule("linear").alphas_cumprod.float()
    c = torch.tensor([1.5, -0.5])
    g = torch.Generator().manual_seed(0)
    out = run(name, exact_eps([c], ac), torch.randn(512, 2, generator=g), ac, spaced_timesteps(1000, 50), g)
    assert (out - c).abs().max() < 1e-3, (name, (out - c).abs().max())


@pytest.mark.parametrize("name", sorted(DIFFUSION_SAMPLERS))
def test_samplers_split_mass_between_two_points(name):
    ac = VPSchedule("linear").alphas_cumprod.float()
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    g = torch.Generator().manual_seed(1)
    out = run(name, exact_eps([a, b], ac), torch.randn(4000, 2, generator=g), ac, spaced_timesteps(1000, 100), g)
    da, db = (out - a).norm(dim=1), (out - b).norm(dim=1)
    assert torch.minimum(da, db).quantile(0.99) < 0.05, name        # samples land on the data
    assert abs((da < db).float().mean().item() - 0.5) < 0.05, name  # with the right mass on each


def test_ddim_eta_one_is_stochastic_and_eta_zero_is_not():
    ac = VPSchedule("linear").alphas_cumprod.float()
    eps_fn = exact_eps([torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])], ac)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    ts = spaced_timesteps(1000, 20)
    d1 = sample_ddim(eps_fn, x, ac, ts, 0.0, torch.Generator().manual_seed(0))
    d2 = sample_ddim(eps_fn, x, ac, ts, 0.0, torch.Generator().manual_seed(1))
    s1 = sample_ddim(eps_fn, x, ac, ts, 1.0, torch.Generator().manual_seed(0))
    s2 = sample_ddim(eps_fn, x, ac, ts, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(d1, d2) and not torch.equal(s1, s2)


def test_flow_euler_maruyama_on_exact_two_point_velocity():
    from test_flow_maths import two_point_velocity

    a, b = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0])
    g = torch.Generator().manual_seed(2)
    sigmas = torch.cat([torch.linspace(1.0, 0.02, 200), torch.zeros(1)])
    out = sample_euler_maruyama(two_point_velocity(a, b), torch.randn(4000, 2, generator=g), sigmas, 1.0, g)
    da, db = (out - a).norm(dim=1), (out - b).norm(dim=1)
    assert torch.minimum(da, db).quantile(0.99) < 0.1
    assert abs((da < db).float().mean().item() - 0.5) < 0.05


def test_spaced_timesteps():
    ts = spaced_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)


MU, S = torch.tensor([1.0, -1.0]), 0.5


def gaussian_eps(ac):
    """Exact eps for data N(MU, S^2 I): E[x0 | x_t] = MU + a S^2 / (a^2 S^2 + s^2) (x_t - a MU)."""
    def eps_fn(x, t):
        ab = ac[t].to(x.dtype)[:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (x - a * MU)
        return (x - a * x0) / s
    return eps_fn


# (steps, mean tolerance, std tolerance): DDIM is first order (its std is 3% low at 100 steps,
# 1.2% at 250); annealed Langevin is biased at finite steps per level (Song & Ermon 2019)
GAUSSIAN_SETTINGS = {"ddpm": (250, 0.02, 0.03), "ddim": (250, 0.02, 0.03), "vp_sde": (250, 0.02, 0.03),
                     "langevin": (100, 0.03, 0.05)}


@pytest.mark.parametrize("name", sorted(DIFFUSION_SAMPLERS))
def test_samplers_reproduce_a_gaussian_mean_and_std(name):
    """A distributional oracle: a sampler (or an eps) off by a few percent moves the std."""
    ac = VPSchedule("linear").alphas_cumprod.float()
    steps, mean_tol, std_tol = GAUSSIAN_SETTINGS[name]
    ts = spaced_timesteps(1000, steps)

    def go(eps_fn, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(20000, 2, generator=g)
        if name == "langevin":
            return sample_langevin(eps_fn, x, ac, ts, steps_per_level=20, step_scale=0.5, generator=g)
        return run(name, eps_fn, x, ac, ts, g)

    out = go(gaussian_eps(ac), 4)
    assert (out.mean(0) - MU).abs().max() < mean_tol, (name, out.mean(0))
    assert (out.std(0) / S - 1).abs().max() < std_tol, (name, out.std(0))
    biased = go(lambda x, t: 0.9 * gaussian_eps(ac)(x, t), 5)
    assert (biased.std(0) / S - 1).abs().max() > std_tol, (name, biased.std(0))  # the check can fail


def test_flow_euler_maruyama_reproduces_a_gaussian():
    def velocity(x, t):
        tt = t[:, None]
        x0 = MU + (1 - tt) * S ** 2 / ((1 - tt) ** 2 * S ** 2 + tt ** 2) * (x - (1 - tt) * MU)
        return (x - x0) / tt
    g = torch.Generator().manual_seed(5)
    out = sample_euler_maruyama(velocity, torch.randn(20000, 2, generator=g), flow_sigmas(200), 1.0, g)
    assert (out.mean(0) - MU).abs().max() < 0.02 and (out.std(0) / S - 1).abs().max() < 0.03, (out.mean(0), out.std(0))
