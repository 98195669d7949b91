"""Statistics of an autoencoder's bottleneck: the VAE's KL term and a VQ codebook's usage."""
from __future__ import annotations

import torch
from torch import Tensor


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(m, s^2) || N(0, I)) per sample, summed over latent dims: -1/2 sum(1 + log s^2 - m^2 - s^2)."""
    return -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).flatten(1).sum(1)


def code_statistics(idx: Tensor, num_codes: int) -> tuple[float, float]:
    """(fraction of codes used, perplexity exp(H(p))) of a batch of code indices."""
    p = torch.bincount(idx.flatten(), minlength=num_codes).float()
    p = p / p.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((p > 0).float().mean()), float(entropy.exp())
