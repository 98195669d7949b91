"""GAN losses and penalties against hand computations (no training)."""
import math

import pytest
import torch

from gentrain.maths.gan_losses import LOSSES, d_loss, g_loss, gradient_penalty, r1_penalty


def test_losses_on_known_logits():
    r, f = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    bce_d = (sp(-2) + sp(0)) / 2 + (sp(-1) + sp(1)) / 2
    assert d_loss("minimax", r, f).item() == pytest.approx(bce_d)
    assert d_loss("nonsaturating", r, f).item() == pytest.approx(bce_d)
    assert g_loss("minimax", f).item() == pytest.approx(-(sp(-1) + sp(1)) / 2)          # log(1 - D(G(z)))
    assert g_loss("nonsaturating", f).item() == pytest.approx((sp(1) + sp(-1)) / 2)     # -log D(G(z))
    assert d_loss("lsgan", r, f).item() == pytest.approx(0.5 * (1 + 1) / 2 + 0.5 * (1 + 1) / 2)
    assert g_loss("lsgan", f).item() == pytest.approx(0.5 * (4 + 0) / 2)
    assert d_loss("wgan", r, f).item() == pytest.approx(0.0 - 1.0)
    assert g_loss("wgan", f).item() == pytest.approx(0.0)
    assert d_loss("hinge", r, f).item() == pytest.approx((0 + 1) / 2 + (0 + 2) / 2)
    assert g_loss("hinge", f).item() == pytest.approx(0.0)
    for name in LOSSES:  # a perfect discriminator has a lower loss than a fooled one
        assert d_loss(name, torch.full((4,), 3.0), torch.full((4,), -3.0)) < d_loss(name, torch.full((4,), -3.0),
                                                                                     torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        d_loss("nope", r, f)


def test_minimax_generator_saturates_where_nonsaturating_does_not():
    f = torch.tensor([-8.0], requires_grad=True)  # D confidently rejects the fake
    (gm,) = torch.autograd.grad(g_loss("minimax", f), f)
    (gn,) = torch.autograd.grad(g_loss("nonsaturating", f), f)
    assert abs(gm.item()) < 1e-3 < abs(gn.item())


def test_gradient_penalty_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    eps = torch.rand(5, 1, generator=g)
    w = torch.tensor([3.0, 0.0, 4.0])   # linear critic: grad = w, ||w|| = 5
    assert gradient_penalty(lambda x: x @ w, real, fake, eps).item() == pytest.approx((5 - 1) ** 2)
    # quadratic critic 1/2 ||x||^2: grad = x_hat
    x_hat = eps * real + (1 - eps) * fake
    want = ((x_hat.norm(dim=1) - 1) ** 2).mean()
    got = gradient_penalty(lambda x: 0.5 * (x ** 2).sum(1), real, fake, eps)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # it is differentiable in the critic's parameters (create_graph): d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w/||w||
    wp = w.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(gradient_penalty(lambda x: x @ wp, real, fake, eps), wp)
    assert torch.allclose(dw, 2 * 4 * w / 5)


def test_gradient_penalty_images_per_sample():
    real, fake = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    eps = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    # critic 1/2 sum x^2: grad = x_hat, ||x_hat|| = 0 (fake) and 2 (real, 4 ones)
    got = gradient_penalty(lambda x: 0.5 * (x ** 2).flatten(1).sum(1), real, fake, eps)
    assert got.item() == pytest.approx(((0 - 1) ** 2 + (2 - 1) ** 2) / 2)


def test_r1_penalty_equals_hand_computation():
    real = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    assert r1_penalty(lambda x: x @ torch.tensor([3.0, 4.0]), real).item() == pytest.approx(25.0)
    assert r1_penalty(lambda x: 0.5 * (x ** 2).sum(1), real).item() == pytest.approx((5 + 1) / 2)
