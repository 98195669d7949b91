"""The GAN losses and penalties (the table in adversarial.py's docstring), small free functions each
tested alone, and the mode-seeking term for conditional GANs.

Mode seeking (MSGAN, Mao et al. 2019): within a condition, different noise must give different
images. A conditional generator can meet its discriminator with one image per condition: nothing in
the adversarial loss rewards using z once the condition decides the image (measured on cgan_digits
at 600 steps: intra-class diversity 0.14 of real digits'). MSGAN pairs samples that share a
condition and maximises the ratio of their image distance to their noise distance,

  ratio = mean |G(c, z1) - G(c, z2)| / mean |z1 - z2|,   L_G += lambda / (ratio + 1e-5),

as the authors' code (HelenMao/MSGAN, DCGAN-Mode-Seeking) computes it: means of absolute
differences over the pairs. Here the pairs are the generator batch's first and second halves
(sample i + n/2 takes sample i's condition), so the term costs no extra forward pass.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("minimax", "nonsaturating", "lsgan", "wgan", "wgan_gp", "hinge")


def d_loss(name: str, real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's (critic's) loss on real and fake logits, without penalties."""
    real, fake = real.float(), fake.float()
    if name in ("minimax", "nonsaturating"):
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if name == "lsgan":
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean()
    if name in ("wgan", "wgan_gp"):
        return fake.mean() - real.mean()
    if name == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    raise ValueError(f"unknown GAN loss {name!r}; choose one of {', '.join(LOSSES)}")


def g_loss(name: str, fake: Tensor) -> Tensor:
    """The generator's loss on the discriminator's logits of its samples."""
    fake = fake.float()
    if name == "minimax":
        return -F.softplus(fake).mean()
    if name == "nonsaturating":
        return F.softplus(-fake).mean()
    if name == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    if name in ("wgan", "wgan_gp", "hinge"):
        return -fake.mean()
    raise ValueError(f"unknown GAN loss {name!r}; choose one of {', '.join(LOSSES)}")


def _input_grad(critic: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.float().sum(), x, create_graph=True)
    return grad.flatten(1)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """WGAN-GP's E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = eps*real + (1-eps)*fake, eps (B, 1, ...)
    uniform: per sample, so the critic must not mix samples (no BatchNorm)."""
    x_hat = eps * real.detach() + (1 - eps) * fake.detach()
    return ((_input_grad(critic, x_hat).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(critic: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """E ||grad_x D(x_real)||^2 (times gamma/2 by the caller)."""
    return _input_grad(critic, real).pow(2).sum(1).mean()


def mode_seeking_ratio(fake_a: Tensor, fake_b: Tensor, z_a: Tensor, z_b: Tensor) -> Tensor:
    """mean |fake_a - fake_b| / mean |z_a - z_b| (0-d float32): the image change per unit of noise."""
    return (fake_a.float() - fake_b.float()).abs().mean() / (z_a.float() - z_b.float()).abs().mean()


def pair_conditions(cond: dict[str, Tensor], n: int, pairs: int) -> dict[str, Tensor]:
    """``cond`` with samples pairs..2*pairs-1 given the conditions of samples 0..pairs-1 (the rest,
    an odd last one, kept): the mode-seeking pairs (i, i + pairs) share a condition. pairs 0: as is."""
    if not pairs or not cond:
        return cond
    idx = torch.arange(n, device=next(iter(cond.values())).device)
    idx[pairs:2 * pairs] = idx[:pairs]
    return {k: v[idx] for k, v in cond.items()}
