"""MLP generator and discriminator for 2-D toy GANs, as in the VEEGAN (Srivastava et al. 2017) and
PacGAN (Lin et al. 2018) mixture-of-Gaussians experiments."""
from __future__ import annotations

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

MLP_NORMS = ("none", "layer")


class MLPGenerator(ModelMixin, ConfigMixin):
    """ReLU MLP: `depth` hidden layers of width `hidden`, (B, z_dim) -> (B, out_dim), no output squashing."""

    @register_to_config
    def __init__(self, z_dim: int = 2, hidden: int = 256, depth: int = 3, out_dim: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        width = z_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(True)]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """LeakyReLU(0.2) MLP: `depth` hidden layers (each optionally LayerNorm'd), (B, in_dim) -> (B,) logits."""

    def __init__(self, in_dim: int = 2, hidden: int = 256, depth: int = 3, norm: str = "none"):
        super().__init__()
        if norm not in MLP_NORMS:
            raise ValueError(f"norm must be one of {MLP_NORMS}, got {norm!r}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden) if norm == "layer" else nn.Identity(),
                       nn.LeakyReLU(0.2, True)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)
