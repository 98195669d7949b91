"""Image-to-image generators: the Pix2Pix U-Net (Isola et al. 2017) and the CycleGAN ResNet
generator (Zhu et al. 2017). Both map (B, in_channels, H, W) to (B, out_channels, H, W) in
[-1, 1] (tanh). Their discriminator is :class:`gentrain.modeling.discriminators.PatchGAN`
(Pix2Pix's takes the channel concatenation of (input, output): in_channels + out_channels).
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn


class UNetGenerator(ModelMixin, ConfigMixin):
    """Pix2Pix U-Net: log2(image_size) Conv(4, 2, 1) steps down to 1x1, as many ConvTranspose(4,
    2, 1) steps up, each up step's output concatenated with the matching down step's (the skips).

    Encoder: LeakyReLU(0.2) before every conv but the first; BatchNorm after every conv but the
    first and the innermost (1x1: batch statistics of one value per image, as in the authors'
    code). Widths base * (1, 2, 4, 8, 8, ...). Decoder: ReLU, ConvTranspose, BatchNorm, and
    Dropout(``dropout``) on the min(3, levels - 1) innermost up steps (the paper's first three
    decoder layers at 256 px); the outermost up step ends in tanh, without norm or dropout.
    Pix2Pix's noise is that dropout: keep it in train mode when sampling for diversity.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 32, image_size: int = 16,
                 dropout: float = 0.5):
        super().__init__()
        levels = int(round(math.log2(image_size)))
        if image_size < 4 or 2 ** levels != image_size:
            raise ValueError(f"UNetGenerator: image_size={image_size} must be a power of 2, at least 4")
        widths = [base * min(2 ** i, 8) for i in range(levels)]
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            inner = i == levels - 1
            conv = nn.Conv2d(in_channels if i == 0 else widths[i - 1], w, 4, 2, 1, bias=i == 0 or inner)
            self.down.append(conv if i == 0 else nn.Sequential(
                nn.LeakyReLU(0.2), conv, *([] if inner else [nn.BatchNorm2d(w)])))
        self.up = nn.ModuleList()  # self.up[i] undoes self.down[i]
        for i, w in enumerate(widths):
            cin = w if i == levels - 1 else 2 * w
            if i == 0:
                self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(cin, out_channels, 4, 2, 1), nn.Tanh()))
                continue
            layers = [nn.ReLU(), nn.ConvTranspose2d(cin, widths[i - 1], 4, 2, 1, bias=False),
                      nn.BatchNorm2d(widths[i - 1])]
            if dropout > 0 and i >= levels - 3:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        y = skips.pop()
        for i in range(len(self.up) - 1, 0, -1):
            y = torch.cat([skips.pop(), self.up[i](y)], 1)
        return self.up[0](y)


class _ResnetBlock(nn.Module):
    def __init__(self, ch: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=norm == "instance"), _norm(norm, ch),
                                  nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=norm == "instance"),
                                  _norm(norm, ch))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _norm(kind: str, ch: int) -> nn.Module:
    # CycleGAN's instance norm: no affine parameters, no running statistics
    return nn.InstanceNorm2d(ch) if kind == "instance" else nn.BatchNorm2d(ch)


class ResnetGenerator(ModelMixin, ConfigMixin):
    """CycleGAN generator: ReflectionPad(3) + Conv7x7(base), ``n_down`` stride-2 Conv3x3 (width
    doubling), ``n_blocks`` residual blocks (ReflectionPad(1), Conv3x3, norm, ReLU, ReflectionPad(1),
    Conv3x3, norm, plus the input), ``n_down`` ConvTranspose3x3 stride 2 (width halving), then
    ReflectionPad(3) + Conv7x7 + tanh; norm + ReLU after every conv but the last. ``norm``:
    "instance" (CycleGAN's: InstanceNorm2d without affine parameters) or "batch". H and W must
    be multiples of 2**n_down."""

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 32, n_blocks: int = 6,
                 n_down: int = 2, norm: str = "instance"):
        super().__init__()
        if norm not in ("instance", "batch"):
            raise ValueError(f"ResnetGenerator: norm={norm!r}: choose instance or batch")
        bias = norm == "instance"  # BatchNorm's shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, base, 7, bias=bias),
                                   _norm(norm, base), nn.ReLU()]
        ch = base
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, 2 * ch, 3, 2, 1, bias=bias), _norm(norm, 2 * ch), nn.ReLU()]
            ch *= 2
        layers += [_ResnetBlock(ch, norm) for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1, bias=bias), _norm(norm, ch // 2),
                       nn.ReLU()]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
