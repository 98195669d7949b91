"""The VEEGAN/PacGAN 2-D mixtures (ring8, grid25) and their mode metrics."""
from __future__ import annotations

import math

import pytest
import torch

from gentrain.data_pipeline.toy2d import TOY2D, Toy2DStream, sample_toy2d, toy2d_modes
from gentrain.eval.metrics import mode_metrics


def test_mixture_centres_and_spread():
    ring, s = toy2d_modes("ring8")
    assert ring.shape == (8, 2) and s == 0.02
    assert torch.allclose(ring.norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(ring[0], torch.tensor([2.0, 0.0])) and torch.allclose(ring[2], torch.tensor([0.0, 2.0]),
                                                                                atol=1e-6)
    grid, s = toy2d_modes("grid25")
    assert grid.shape == (25, 2) and s == 0.05
    assert sorted({tuple(p) for p in grid.tolist()}) == [(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)]
    with pytest.raises(ValueError, match="ring8 or grid25"):
        toy2d_modes("8gaussians")
    assert {"ring8", "grid25", "8gaussians"} <= set(TOY2D)
    g = torch.Generator().manual_seed(0)
    for name in ("ring8", "grid25"):
        centers, std = toy2d_modes(name)
        x = sample_toy2d(name, 20000, g)
        d, k = torch.cdist(x, centers).min(dim=1)
        # per-mode offsets have the stated std and every mode has weight 1/K
        assert abs(float((x - centers[k]).std()) - std) < 0.05 * std
        assert torch.bincount(k, minlength=len(centers)).min() > 0.8 * 20000 / len(centers)
    assert next(iter(Toy2DStream("grid25", 8)))["x"].shape == (8, 2)


def test_8gaussians_unchanged():
    x = sample_toy2d("8gaussians", 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 8, (5,), generator=g).float() * (2 * math.pi / 8)
    want = torch.stack([torch.cos(k), torch.sin(k)], 1) * 2.0 + 0.2 * torch.randn(5, 2, generator=g)
    assert torch.equal(x, want)


def test_exact_counts_on_built_samples():
    centers, std = toy2d_modes("grid25")
    at3 = centers[[0, 7, 19]].repeat_interleave(30, dim=0)  # 90 samples exactly on 3 centres
    assert mode_metrics(at3, centers, std) == {"modes": 3, "num_modes": 25, "hq_fraction": 1.0, "n": 90}
    off = centers + torch.tensor([4 * std, 0.0])  # 4 std from every centre: no HQ sample, no mode
    assert mode_metrics(off, centers, std) == {"modes": 0, "num_modes": 25, "hq_fraction": 0.0, "n": 25}
    near = centers[:4] + torch.tensor([0.0, 2.9 * std])
    assert mode_metrics(near, centers, std)["hq_fraction"] == 1.0
    diag = centers[:1] + torch.tensor([[2.2 * std, 2.2 * std]])  # each axis < 3 std, the radius 3.11 std is not
    assert mode_metrics(diag, centers, std)["hq_fraction"] == 0.0
    # 2,500 samples: 20 on mode 0, 19 on mode 1, the rest far from every mode
    x = torch.cat([centers[:1].repeat(20, 1), centers[1:2].repeat(19, 1), torch.full((2461, 2), 50.0)])
    assert mode_metrics(x, centers, std, min_hq=20) == {"modes": 1, "num_modes": 25, "hq_fraction": 39 / 2500,
                                                         "n": 2500}
    assert mode_metrics(x, centers, std)["modes"] == 2  # the default: a single HQ sample captures a mode
    with pytest.raises(ValueError, match="must both be"):
        mode_metrics(torch.zeros(4, 3), centers, std)


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_real_samples_capture_every_mode(name):
    centers, std = toy2d_modes(name)
    for seed in range(3):
        m = mode_metrics(sample_toy2d(name, 2500, torch.Generator().manual_seed(seed)), centers, std, min_hq=20)
        assert m["modes"] == len(centers) and m["n"] == 2500
        # the expected HQ fraction is 1 - exp(-4.5) = 98.89%; its sd at N=2,500 is 0.21%
        assert m["hq_fraction"] > 0.98, m
