"""QwenImagePipeline (Qwen-Image): a QwenImageTransformer2DModel (MMDiT) trained by flow matching as diffusers'
examples/dreambooth/train_dreambooth_lora_qwen_image.py trains it, conditioned on what the pipeline's own
encode_prompt computes: the Qwen2.5-VL encoder's last hidden states under the pipeline's chat template, its
first `prompt_template_encode_start_idx` (34) tokens dropped, with their mask.

Latents: AutoencoderKLQwenImage encodes 5-D (B, C, frames, H, W) video latents; an image is one frame, so the
space squeezes that axis and normalises per channel, (z - latents_mean) / latents_std, as the script does
((z - mean) * (1 / std)) and the pipeline undoes. The transformer sees them 2x2-packed (QwenImagePipeline's
_pack_latents) with img_shapes [(1, h / 2, w / 2)] and timestep sigma (the scheduler's timestep / 1000).

Training sigmas: the script indexes the scheduler's own training grid (noise_scheduler_copy.sigmas); Qwen-Image's
scheduler has use_dynamic_shifting, so that grid is unshifted (the `shift` the script passes is never applied)
and maths/flow_timesteps.py's SchedulerSigmas, built from the same config, is that grid. Dynamic shifting (mu
from the image's token count) applies at inference only, in the stock pipeline that draws previews and exports.
The script's defaults: weighting_scheme none (uniform u), max_sequence_length 512.

Prompts are padded to MAX_SEQUENCE_LENGTH with zero states and mask 0 (so a batch, the "" encoding a dropped
caption conditions on, and cached shards share one shape); the transformer call trims the padding shared by the
whole batch and passes no mask where every token counts, as the pipeline does. LoRA on the transformer only:
QwenImageLoraLoaderMixin's load_lora_weights takes no text-encoder keys (base.py refuses text_encoder_lora).
A run on cached shards (cached.py) loads no VLM with the pipeline; its previews encode their prompts with the VLM
held on the CPU (host_encode) and draw with prompt_embeds.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.objectives.adapters.base import PipelineAdapter
from gentrain.objectives.adapters.sd3 import _Routed
from gentrain.objectives.latent import LatentSpace, check_autoencoder_fit

MAX_SEQUENCE_LENGTH = 512   # Qwen2.5-VL tokens after the template: train_dreambooth_lora_qwen_image.py's default
QWEN_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]   # the script's default --lora_layers


class QwenImageTransformer(nn.Module):
    """gentrain's denoiser call around a QwenImageTransformer2DModel: forward(x_t, timestep, emb, mask) on
    unpacked (B, C, h, w) latents and the scheduler's timestep (sigma * 1000)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        from diffusers import QwenImagePipeline

        b, c, h, w = x.shape
        if mask is not None:   # drop the padding every sample shares; no mask where all tokens count
            n = max(int(mask.sum(1).max()), 1)
            emb, mask = emb[:, :n], mask[:, :n]
            mask = None if bool(mask.all()) else mask.to(torch.long)
        packed = QwenImagePipeline._pack_latents(x, b, c, h, w)
        out = self.model(hidden_states=packed, timestep=timestep / 1000, encoder_hidden_states=emb,
                         encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, h, w, 1)[:, :, 0]


class QwenLatentSpace(LatentSpace):
    """AutoencoderKLQwenImage's latents of single-frame images, (z - latents_mean) / latents_std per channel."""

    @classmethod
    def from_vae(cls, vae: Any, image_size: int, channels: int) -> "QwenLatentSpace":
        self = cls(None, image_size, channels)   # no scaling_factor / shift_factor: per-channel statistics instead
        self.vae, self.kind = vae.eval().requires_grad_(False), "kl"
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        post = self.vae.encode(images.to(self.vae.dtype).unsqueeze(2)).latent_dist   # one frame
        return post.mean[:, :, 0], post.logvar[:, :, 0]

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    def denormalize(self, latents: Tensor) -> Tensor:
        return latents * self.std.to(latents.device) + self.mean.to(latents.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = self.denormalize(latents.float()).to(self.vae.dtype).unsqueeze(2)
        return self.vae.decode(z).sample[:, :, 0].float()


@lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """The class's own prompt template, its drop index and tokenizer length (read off a pipeline built empty)."""
    from diffusers import QwenImagePipeline

    blank = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return {k: getattr(blank, k) for k in ("prompt_template_encode", "prompt_template_encode_start_idx",
                                           "tokenizer_max_length")}


class _PromptView:
    """What QwenImagePipeline.encode_prompt reads (tokenizer, encoder, the template and its drop index), with the
    class's methods bound to it."""

    def __init__(self, parts: dict[str, Any], call: Callable[..., Any], device: torch.device):
        from diffusers import QwenImagePipeline

        for name, value in _template().items():
            setattr(self, name, value)
        self.tokenizer, self.text_encoder = parts["tokenizer"], _Routed("text_encoder", parts["text_encoder"], call)
        self._execution_device = device
        cls = QwenImagePipeline
        self.encode_prompt = cls.encode_prompt.__get__(self)
        self._get_qwen_prompt_embeds = cls._get_qwen_prompt_embeds.__get__(self)
        self._extract_masked_hidden = cls._extract_masked_hidden.__get__(self)


class QwenImageAdapter(PipelineAdapter):
    pipeline_class = "QwenImagePipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder",)
    lora_text_encoders = ()                            # QwenImageLoraLoaderMixin: the transformer only
    denoiser_targets = QWEN_TARGETS
    cache_unloaded = ("text_encoder", "tokenizer")     # the VLM: its states and masks come from the cache
    default_guidance = 4.0   # QwenImagePipeline.__call__'s true_cfg_scale (pipeline_qwenimage.py, diffusers 0.42.1)

    def __init__(self, pipe: Any, pretrained: str = ""):
        super().__init__(pipe, pretrained)
        scheduler = self.parts["scheduler"]
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise GentrainError(f"config key 'model.pretrained': {pretrained!r} has a {type(scheduler).__name__}; "
                                "Qwen-Image fine-tuning trains on a FlowMatchEulerDiscreteScheduler's sigmas")

    def kind(self) -> str:
        return "flow"

    def latent_space(self, image_size: int, channels: int) -> QwenLatentSpace:
        vae, net = self.parts["vae"], self.parts["transformer"]
        c = vae.config   # the shared check on the fields it reads: image channels, latent channels, factor
        fit = {"in_channels": c.get("input_channels", 3), "latent_channels": c.z_dim,
               "block_out_channels": [0] * (len(c.temperal_downsample) + 1)}
        check_autoencoder_fit(fit, channels=channels, image_size=image_size, key="model.pretrained",
                              net_in_channels=int(net.config.in_channels) // 4)   # 2x2-packed channels
        factor = 2 ** len(c.temperal_downsample) * 2
        if image_size % factor:
            raise GentrainError(f"config key 'data.image_size': {image_size} is not a multiple of {factor} (the VAE's "
                                "downsampling times the transformer's 2x2 packing)")
        return QwenLatentSpace.from_vae(vae, image_size, channels)

    def wrap(self, net: nn.Module) -> nn.Module:
        return QwenImageTransformer(net)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        """{"emb": (B, 512, joint_attention_dim), "mask": (B, 512)}: encode_prompt's prompt_embeds and mask (ones
        where it gives none), zero-padded to MAX_SEQUENCE_LENGTH."""
        device = next(self.parts["text_encoder"].parameters()).device
        emb, mask = _PromptView(self.parts, call, device).encode_prompt(
            prompt=list(captions), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        if mask is None:
            mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        pad = MAX_SEQUENCE_LENGTH - emb.shape[1]
        return {"emb": F.pad(emb, (0, 0, 0, pad)), "mask": F.pad(mask, (0, pad)).to(emb.dtype)}

    @classmethod
    def load(cls, m: Any, **kw: Any) -> "QwenImageAdapter":
        adapter = super().load(m, **kw)
        adapter.revision, adapter._host_encoder = m.revision, None
        return adapter

    def call_kwargs(self, prompts: list[str], scale: float) -> dict[str, Any]:
        """True classifier-free guidance against "" (what a dropped caption trains on); the transformer has no
        guidance embedding, so the pipeline's guidance_scale stays unset. In a run on cached shards the VLM is not
        loaded with the pipeline: the prompts encode on the host (host_encoder) and go in as prompt_embeds."""
        negative = [""] * len(prompts) if scale > 1 else None
        kw: dict[str, Any] = {"true_cfg_scale": scale if negative else 1.0}
        if self.parts.get("text_encoder") is not None:
            return {**kw, "prompt": prompts, **({"negative_prompt": negative} if negative else {})}
        device, dtype = next(self.parts["transformer"].parameters()).device, self.parts["vae"].dtype
        kw["prompt_embeds"], kw["prompt_embeds_mask"] = self.host_encode(prompts, device, dtype)
        if negative:
            kw["negative_prompt_embeds"], kw["negative_prompt_embeds_mask"] = self.host_encode(negative, device, dtype)
        return kw

    @torch.no_grad()
    def host_encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """encode_prompt's (states, mask) of a few prompts by the VLM loaded once on the CPU (never on the
        accelerator) in the run's frozen dtype: previews and eval of a run on cached shards."""
        if self._host_encoder is None:
            import diffusers

            pipe = diffusers.QwenImagePipeline.from_pretrained(self.pretrained, revision=self.revision, transformer=None,
                                                               vae=None)
            self._host_encoder = {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder.to(dtype).eval()}
        cpu, encoder = torch.device("cpu"), self._host_encoder["text_encoder"]
        emb, mask = _PromptView(self._host_encoder, lambda name, *a, **k: encoder(*a, **k), cpu).encode_prompt(
            prompt=list(prompts), device=cpu, max_sequence_length=MAX_SEQUENCE_LENGTH)
        mask = torch.ones(emb.shape[:2], dtype=torch.long) if mask is None else mask
        return emb.to(device, dtype), mask.to(device)
