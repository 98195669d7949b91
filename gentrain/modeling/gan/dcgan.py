"""DCGAN generator and discriminator (Radford et al. 2016), optionally class- or text-conditional.

Conditioning: the generator concatenates a condition vector to z: a class embedding, or for text
the masked mean of the frozen encoder's token states, layer-normalised and projected by a FIXED
random basis (a buffer, saved with the weights) to cond_dim. A trained projection there (GAN-INT-CLS's,
Reed et al. 2016) collapsed every run measured on the digits captions: the caption vectors differ
by a std of ~0.02 after mean pooling, Adam moves the projection's tiny-gradient weights at full lr,
the text vector outgrows z at G's BatchNorm and each caption draws one image; with the projection
fixed, G trains like the class-conditional one. The discriminator is a projection discriminator
(Miyato & Koyama 2018), for text on the token states attention-pooled with a learned query (zero at
init: the masked mean) so it can learn which token names the digit.
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

NORMS = ("batch", "layer", "instance", "none")


def num_doublings(image_size: int) -> int:
    """log2(image_size / 4): the number of x2 resolution steps between 4x4 and image_size."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return int(math.log2(image_size)) - 2


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN init in place: Conv/ConvTranspose/Linear weights N(0, 0.02) (biases 0), BatchNorm weights
    N(1, 0.02) (biases 0). Other modules (embeddings, Group/Layer/InstanceNorm) keep their defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def masked_mean(states: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of (B, L, D) token states over the positions where the (B, L) mask is nonzero -> (B, D).

    Masked-out positions are zeroed (not multiplied), so their values, even inf/NaN, never reach the
    output. A row with no valid token gives zeros. mask None: plain mean over L.
    """
    if mask is None:
        return states.mean(dim=1)
    keep = mask.to(torch.bool).unsqueeze(-1)  # (B, L, 1)
    total = states.masked_fill(~keep, 0.0).sum(dim=1)
    count = keep.sum(dim=1).clamp(min=1).to(states.dtype)
    return total / count


class AttentionPool(nn.Module):
    """(B, L, D) token states -> (B, D): softmax(k(states) . q) over the mask's tokens, one learned
    query q (zero at init: exactly the masked mean)."""

    def __init__(self, text_dim: int, key_dim: int = 64):
        super().__init__()
        self.key = nn.Linear(text_dim, key_dim, bias=False)
        self.query = nn.Parameter(torch.zeros(key_dim))

    def forward(self, states: Tensor, mask: Tensor | None) -> Tensor:
        keep = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device) if mask is None else mask.bool()
        clean = states.masked_fill(~keep.unsqueeze(-1), 0.0)
        scores = (self.key(clean) @ self.query) / math.sqrt(self.query.numel())
        weights = scores.masked_fill(~keep, float("-inf")).softmax(dim=1).nan_to_num(0.0)  # no token: zeros
        return (weights.unsqueeze(-1) * clean).sum(dim=1)


def _check_condition(name: str, wanted: int, value: Tensor | None) -> None:
    if wanted > 0 and value is None:
        raise ValueError(f"this model is conditional ({name}) but `{name}` was not given")
    if wanted == 0 and value is not None:
        raise ValueError(f"this model is not {name}-conditional but `{name}` was given")


def _norm2d(kind: str, ch: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    return {"batch": lambda: nn.BatchNorm2d(ch), "layer": lambda: nn.GroupNorm(1, ch),
            "instance": lambda: nn.InstanceNorm2d(ch, affine=True), "none": nn.Identity}[kind]()


class DCGANGenerator(ModelMixin, ConfigMixin):
    """DCGAN generator (Radford et al. 2016): (B, z_dim) -> (B, channels, image_size, image_size) in [-1, 1].

    Linear(z [+ condition]) -> base*2^k x 4 x 4 (BatchNorm, ReLU), then k ConvTranspose2d(4, 2, 1) +
    BatchNorm + ReLU blocks halving the channels (k = log2(image_size / 4)), then a 3x3 output conv + tanh
    with no norm. num_classes > 0: nn.Embedding(num_classes, cond_dim) of the labels is concatenated to z.
    text_dim > 0: the text encoder's token states (B, L, text_dim) are pooled by a masked mean over the
    attention mask (B, L), then Linear(text_dim, cond_dim) + LeakyReLU(0.2), and concatenated to z.
    """

    @register_to_config
    def __init__(self, z_dim: int = 64, image_size: int = 16, channels: int = 1, base: int = 64,
                 num_classes: int = 0, text_dim: int = 0, cond_dim: int = 64):
        super().__init__()
        k = num_doublings(image_size)
        self.label_embed = nn.Embedding(num_classes, cond_dim) if num_classes > 0 else None
        if text_dim > 0:  # fixed (see the module docstring); seeded by the caller's torch RNG like the weights
            self.register_buffer("text_basis", torch.randn(text_dim, cond_dim) / math.sqrt(text_dim))
        in_dim = z_dim + cond_dim * ((num_classes > 0) + (text_dim > 0))
        ch = base * 2 ** k
        self.project = nn.Sequential(nn.Linear(in_dim, ch * 16, bias=False), nn.Unflatten(1, (ch, 4, 4)),
                                     nn.BatchNorm2d(ch), nn.ReLU(True))
        blocks: list[nn.Module] = []
        for _ in range(k):
            blocks += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(ch, channels, 3, 1, 1)
        dcgan_init_(self)

    def condition(self, z: Tensor, labels: Tensor | None = None, text: Tensor | None = None,
                  text_mask: Tensor | None = None) -> Tensor:
        """z with the condition vectors concatenated: (B, z_dim + cond_dim * number of conditions)."""
        _check_condition("labels", self.config.num_classes, labels)
        _check_condition("text", self.config.text_dim, text)
        parts = [z]
        if self.label_embed is not None:
            parts.append(self.label_embed(labels))
        if self.config.text_dim > 0:
            pooled = nn.functional.layer_norm(masked_mean(text, text_mask), (self.config.text_dim,))
            parts.append(pooled @ self.text_basis)
        return torch.cat(parts, dim=1)

    def forward(self, z: Tensor, labels: Tensor | None = None, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        h = self.blocks(self.project(self.condition(z, labels, text, text_mask)))
        return torch.tanh(self.to_image(h))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator (Radford et al. 2016) with projection conditioning (Miyato & Koyama 2018).

    Conv2d(4, 2, 1) + LeakyReLU(0.2) blocks doubling the channels from `base` down to 4x4; no norm on the
    input layer, `norm` on the others ("layer" is GroupNorm(1, ch): per-sample, so usable with a gradient
    penalty). A 4x4 valid conv + LeakyReLU gives the feature h (B, F), F = the 4x4 stage's channels.
    logit = linear(h) + sum(embed(y) * h, dim=1), where embed(y) is nn.Embedding(num_classes, F) (init
    N(0, 0.02)) for labels and, for text, the masked-mean pooled token states -> Linear(text_dim, cond_dim)
    + LeakyReLU(0.2) -> Linear(cond_dim, F).
    forward -> (B,) raw logits.
    """

    def __init__(self, image_size: int = 16, channels: int = 1, base: int = 64, norm: str = "batch",
                 num_classes: int = 0, text_dim: int = 0, cond_dim: int = 64):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.num_classes, self.text_dim = num_classes, text_dim
        k = num_doublings(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base
        for _ in range(k - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=norm == "none"), _norm2d(norm, ch * 2),
                       nn.LeakyReLU(0.2, True)]
            ch *= 2
        self.blocks = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Conv2d(ch, ch, 4, 1, 0), nn.Flatten(), nn.LeakyReLU(0.2, True))
        self.feature_dim = ch
        self.linear = nn.Linear(ch, 1)
        self.label_embed = nn.Embedding(num_classes, ch) if num_classes > 0 else None
        self.text_pool = AttentionPool(text_dim) if text_dim > 0 else None
        self.text_proj = (nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, cond_dim), nn.LeakyReLU(0.2),
                                        nn.Linear(cond_dim, ch)) if text_dim > 0 else None)
        dcgan_init_(self)
        if self.label_embed is not None:  # N(0, 0.02) like the linear head, not N(0, 1): O(0.1) logits at init
            nn.init.normal_(self.label_embed.weight, 0.0, 0.02)

    def forward(self, x: Tensor, labels: Tensor | None = None, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> Tensor:
        _check_condition("labels", self.num_classes, labels)
        _check_condition("text", self.text_dim, text)
        h = self.features(self.blocks(x))  # (B, F)
        logit = self.linear(h).squeeze(1)
        if self.label_embed is not None:
            logit = logit + (self.label_embed(labels) * h).sum(dim=1)
        if self.text_proj is not None:
            logit = logit + (self.text_proj(self.text_pool(text, text_mask)) * h).sum(dim=1)
        return logit
