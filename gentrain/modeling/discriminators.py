"""Discriminators. PatchGAN (Isola et al. 2017): a grid of real/fake logits over image patches."""
from __future__ import annotations

from torch import Tensor, nn


def _norm(kind: str, ch: int) -> nn.Module:
    return {"batch": lambda: nn.BatchNorm2d(ch), "instance": lambda: nn.InstanceNorm2d(ch, affine=True),
            "group": lambda: nn.GroupNorm(min(32, ch // 4) or 1, ch), "none": nn.Identity}[kind]()


class PatchGAN(nn.Module):
    """N-layer PatchGAN: 4x4 convs, stride 2 then 1, LeakyReLU(0.2); (B, C, H, W) -> (B, 1, h, w) logits."""

    def __init__(self, in_channels: int = 3, base: int = 64, layers: int = 3, norm: str = "group"):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base
        for i in range(1, layers + 1):
            out = base * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(ch, out, 4, stride, 1, bias=norm == "none"), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
