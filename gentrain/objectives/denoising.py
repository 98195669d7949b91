"""What diffusion and flow matching share: the denoiser network (toy MLP, UNet, DiT), the space it
runs in (pixels or a frozen autoencoder's latents), the conditioning (text, class, none) with
classifier-free guidance, previews, and the diffusers export. A subclass supplies only its maths:
the training target, its samplers and its export scheduler.

Exports (stock diffusers pipelines, loaded by `DiffusionPipeline.from_pretrained` without gentrain):
  text + AutoencoderKL latents        -> StableDiffusionPipeline
  text + VQModel latents (f8, DDIM)   -> LDMTextToImagePipeline (it pads to 77 tokens, no mask)
  class labels + AutoencoderKL (DiT)  -> DiTPipeline (null class 1000, id2label)
  unconditional pixel space (UNet)    -> DDPMPipeline
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.objectives.base import Objective
from gentrain.objectives.conditioning import NoConditioning, make_conditioning
from gentrain.objectives.latent import LatentConfig, LatentSpace

NETS = ("mlp", "unet", "dit", "pixart", "mmdit")


@dataclass
class DenoiserConfig:
    family: str = ""
    net: str = "mlp"                 # mlp: 2-D toys | unet: UNet2DConditionModel (text) / UNet2DModel | dit: class-conditional DiT
                                     # | pixart: PixArt cross-attention DiT (text + mask) | mmdit: SD3's MMDiT (text + pooled)
    hidden: int = 256                # mlp
    depth: int = 4                   # mlp
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])   # unet
    layers_per_block: int = 1        # unet
    attention_head_dim: int = 8      # unet
    norm_num_groups: int = 16        # unet
    dit_layers: int = 4              # dit, pixart, mmdit: depth (transformer blocks)
    dit_heads: int = 4               # dit, pixart, mmdit: attention heads
    dit_head_dim: int = 32           # dit, pixart, mmdit: width per head (width = dit_heads * dit_head_dim)
    patch_size: int = 1              # dit, pixart, mmdit: latent pixels per token side
    gradient_checkpointing: bool = False
    latent: LatentConfig = field(default_factory=LatentConfig)

    def validate_net(self, cfg: Any) -> None:
        lat = self.latent
        if self.net not in NETS:
            raise GentrainError(f"config key 'model.net': {self.net!r} is not allowed; choose one of {', '.join(NETS)}")
        if self.net == "mlp":
            if cfg.data.source != "toy2d":
                raise GentrainError(f"config key 'model.net': 'mlp' is for 2-D toy data, but data.source is {cfg.data.source!r}")
            if lat.autoencoder or lat.text_encoder or lat.num_classes:
                raise GentrainError("config key 'model.net': 'mlp' is unconditional 2-D; model.latent.autoencoder, "
                                    "text_encoder and num_classes must be unset")
            return
        if cfg.data.source != "shards":
            raise GentrainError(f"config key 'model.net': {self.net!r} trains on shards (images or cached latents)")
        if lat.text_encoder and lat.num_classes:
            raise GentrainError("config keys 'model.latent.text_encoder' and 'model.latent.num_classes' exclude each other")
        if self.net == "dit" and not lat.num_classes:
            raise GentrainError("config key 'model.net': 'dit' is class-conditional (diffusers DiT); set "
                                "model.latent.num_classes, or use model.net=unet for text or no conditioning")
        if self.net in ("pixart", "mmdit") and not lat.text_encoder:
            raise GentrainError(f"config key 'model.net': {self.net!r} is text-conditioned; set model.latent.text_encoder")
        if self.net == "unet" and lat.num_classes:
            raise GentrainError("config key 'model.latent.num_classes': class conditioning uses model.net=dit")
        if self.net == "unet" and any(c % self.norm_num_groups for c in self.block_out_channels):
            raise GentrainError(f"config key 'model.norm_num_groups': {self.norm_num_groups} must divide every "
                                f"model.block_out_channels {list(self.block_out_channels)}")
        if not 0 <= lat.cfg_dropout < 1:
            raise GentrainError(f"config key 'model.latent.cfg_dropout': {lat.cfg_dropout} must be in [0, 1)")
        for key in ("hidden", "depth", "dit_layers", "dit_heads", "dit_head_dim", "patch_size"):
            if getattr(self, key) < 1:
                raise GentrainError(f"config key 'model.{key}': {getattr(self, key)} must be >= 1")
        if self.net in ("pixart", "mmdit") and (self.dit_heads * self.dit_head_dim) % 4:
            raise GentrainError(f"config key 'model.dit_head_dim': the width dit_heads * dit_head_dim = "
                                f"{self.dit_heads * self.dit_head_dim} must be a multiple of 4 (2-D sin-cos positions)")


def build_denoiser(m: DenoiserConfig, space: LatentSpace, conditioning: Any) -> torch.nn.Module:
    from gentrain.modeling.denoisers import ClassDiT, ConditionalUNet, PixelUNet

    c, s = space.latent_channels, space.latent_size()
    if m.net in ("dit", "pixart", "mmdit") and s % m.patch_size:
        raise GentrainError(f"config key 'model.patch_size': {m.patch_size} must divide the latent size {s}")
    if m.net in ("pixart", "mmdit"):
        from gentrain.modeling.text_transformers import MMDiTDenoiser, PixArtDenoiser

        cls = PixArtDenoiser if m.net == "pixart" else MMDiTDenoiser
        return cls(c, s, conditioning.dim, m.dit_layers, m.dit_heads, m.dit_head_dim, m.patch_size,
                   m.gradient_checkpointing)
    if m.net == "dit":
        return ClassDiT(c, s, m.dit_layers, m.dit_heads, m.dit_head_dim, m.patch_size, m.gradient_checkpointing)
    args = (list(m.block_out_channels),)
    if conditioning.kind == "text":
        return ConditionalUNet(c, s, *args, conditioning.dim, m.layers_per_block, m.attention_head_dim,
                               m.norm_num_groups, m.gradient_checkpointing)
    return PixelUNet(c, s, *args, m.layers_per_block, m.attention_head_dim, m.norm_num_groups, m.gradient_checkpointing)


class DenoisingObjective(Objective):
    """Base of the flow and diffusion families; `net_name` names the one trained net."""

    net_name = "denoiser"

    def __init__(self, net: torch.nn.Module, m: Any, *, space: Optional[LatentSpace] = None,
                 conditioning: Any = None, preview_count: int = 16, cfg_dropout: Optional[float] = None,
                 guidance_scale: Optional[float] = None):
        self.nets = {self.net_name: net}
        self.m, self.space = m, space
        self.conditioning = conditioning or NoConditioning()
        if space is None:        # 2-D toy points
            self.data_key, self.sample_shape = "x", (2,)
        else:
            self.data_key = "image"
            self.sample_shape = (space.latent_channels, space.latent_size(), space.latent_size())
        self.cfg_dropout = m.latent.cfg_dropout if cfg_dropout is None else cfg_dropout
        self.guidance_scale = m.latent.guidance_scale if guidance_scale is None else guidance_scale
        self.preview_count = preview_count
        self._preview_request: Optional[dict] = None

    @classmethod
    def from_config(cls, cfg: Any) -> "DenoisingObjective":
        m = cfg.model
        if m.net == "mlp":
            from gentrain.modeling.mlp import TimeConditionedMLP

            # a 2-D density plot wants many points
            return cls(TimeConditionedMLP(dim=2, hidden=m.hidden, depth=m.depth), m, preview_count=4000)
        space = LatentSpace(m.latent.autoencoder, cfg.data.image_size, cfg.data.channels)
        conditioning = make_conditioning(m.latent)
        from gentrain.data_pipeline.cache import check_cache_matches
        from gentrain.data_pipeline.config import shard_specs

        for shards in shard_specs(cfg.data):
            check_cache_matches(shards, scaling_factor=space.scale if space.vae is not None else None,
                                text_encoder=m.latent.text_encoder, max_length=m.latent.max_length,
                                image_size=cfg.data.image_size, channels=cfg.data.channels)
        return cls(build_denoiser(m, space, conditioning), m, space=space, conditioning=conditioning)

    def to(self, device: torch.device) -> "DenoisingObjective":
        super().to(device)
        if self.space is not None:
            self.space.to(device)
        self.conditioning.to(device)
        return self

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["key"]) if self.space is not None else super().batch_size(batch)

    def inputs(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """(x0 (B, ...) the clean data or scaled latents, the net's conditioning kwargs with CFG dropout)."""
        if self.space is None:
            return batch[self.data_key].float(), {}
        if self._preview_request is None:
            self._preview_request = self.conditioning.preview_request(batch)
        x0 = self.space.latents(batch, self.rng)
        return x0, self.conditioning.train(batch, self.cfg_dropout, self.rng)

    def guided(self, cond: dict, uncond: Optional[dict], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
        """net(x, timestep) with classifier-free guidance on the raw output: u + s (c - u), one batch of 2B."""
        net = self.nets[self.net_name]

        def f(x: Tensor, timestep: Tensor) -> Tensor:
            if uncond is None or scale == 1.0:
                return net(x, timestep, **cond)
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            u, c = net(torch.cat([x, x]), torch.cat([timestep, timestep]), **both).chunk(2)
            return u + scale * (c - u)
        return f

    def start(self, n: int, cond: Optional[dict], guidance_scale: Optional[float],
              generator: Optional[torch.Generator]) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
        """Initial noise (n, *sample_shape) and the guided network for a sampling request."""
        x = torch.randn((n, *self.sample_shape), generator=generator, device=self.device)
        c, u = self.conditioning.request(cond, n)
        return x, self.guided(c, u, self.guidance_scale if guidance_scale is None else guidance_scale)

    @property
    def evaluates(self) -> tuple[str, ...]:
        if self.space is None:
            return ("toy2d",)
        return ("shapes", "digits") if self.conditioning.kind == "text" else ("digits",)

    def finish(self, x: Tensor, decode: bool) -> Tensor:
        return self.space.decode(x) if (self.space is not None and decode) else x

    @torch.no_grad()
    def preview(self, generator: Optional[torch.Generator] = None) -> Tensor:
        req = self._preview_request if self.conditioning.kind != "none" else None
        if req is None:
            return super().preview(generator)
        captions = self.conditioning.captions(req)
        self.preview_nrow, self.preview_captions = min(len(captions), 10), captions
        return self.sample(len(captions), req, generator=generator)

    # -- export ---------------------------------------------------------------------------------
    def export_scheduler(self) -> Any:
        raise NotImplementedError

    def export(self, out: Path, cfg: Any, batches: Any = None) -> dict[str, Any]:
        import diffusers

        if self.space is None:
            raise GentrainError("2-D toy models have no diffusers pipeline; their weights export as safetensors")
        net, kind, space = self.nets[self.net_name].model, self.conditioning.kind, self.space
        scheduler = self.export_scheduler()
        if kind == "text" and space.kind == "kl":
            te = self.conditioning.text_encoder
            pipe = diffusers.StableDiffusionPipeline(
                vae=space.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=net, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        elif kind == "text" and space.kind == "vq":
            pipe = self._ldm_pipeline(net, scheduler)
        elif kind == "class" and space.kind == "kl":
            names = self.conditioning.names
            pipe = diffusers.DiTPipeline(transformer=net, vae=space.vae, scheduler=scheduler,
                                         id2label={i: name for i, name in enumerate(names)})
            pipe.register_to_config(id2label={str(i): name for i, name in enumerate(names)})
        elif kind == "none" and space.kind == "pixel":
            pipe = diffusers.DDPMPipeline(unet=net, scheduler=scheduler)
        else:
            raise GentrainError(f"no stock diffusers pipeline runs a {kind}-conditioned model in {space.kind} space; "
                                "exportable: text + AutoencoderKL (StableDiffusionPipeline), text + VQModel f8 "
                                "(LDMTextToImagePipeline), class + AutoencoderKL (DiTPipeline), unconditional "
                                "pixels (DDPMPipeline)")
        pipe.save_pretrained(str(out), safe_serialization=True)
        info = {"diffusers_class": type(pipe).__name__, "scheduler": type(scheduler).__name__,
                "guidance_scale": self.guidance_scale}
        if kind == "text":
            info["max_length"] = self.conditioning.text_encoder.max_length
        return info

    def _ldm_pipeline(self, net: Any, scheduler: Any) -> Any:
        """LDMTextToImagePipeline hard-codes 77 tokens without an attention mask and height // 8 latents."""
        from diffusers import DDIMScheduler, LDMTextToImagePipeline

        te = self.conditioning.text_encoder
        problems = []
        if self.space.factor != 8:
            problems.append(f"the VQModel downsamples by {self.space.factor}, not 8")
        if not isinstance(scheduler, DDIMScheduler):
            problems.append(f"it needs a DDIM scheduler (this model exports {type(scheduler).__name__}; "
                            "use family diffusion with model.sampler=ddim)")
        if te.max_length != 77:
            problems.append(f"it pads prompts to 77 tokens (model.latent.max_length is {te.max_length})")
        if getattr(te.model.config, "use_attention_mask", False):
            problems.append("it passes no attention mask, so it needs a CLIP text encoder")
        if problems:
            raise GentrainError("cannot export VQ latents to LDMTextToImagePipeline: " + "; ".join(problems))
        return LDMTextToImagePipeline(vqvae=self.space.vae, bert=te.model, tokenizer=te.tokenizer, unet=net,
                                      scheduler=scheduler)
