"""FluxPipeline (FLUX.1-dev, FLUX.1-schnell): a FluxTransformer2DModel trained by flow matching as diffusers'
examples/dreambooth/train_dreambooth_lora_flux.py trains it, conditioned on what the pipeline's own encode_prompt
computes: T5's states (encoder_hidden_states, padded to max_sequence_length 512, the script's default and the
pipeline's) and CLIP-L's pooled output (pooled_projections); text_ids are zeros of the T5 length.

The step (wrap): latents (z - shift_factor) * scaling_factor (latent.py), x_t on the scheduler's training grid
(maths/flow_timesteps.py: FLUX.1's scheduler shifts dynamically, so the grid is unshifted, as the script draws it;
the stock pipeline applies the resolution-dependent shift `mu` when sampling), packed 2x2 by
FluxPipeline._pack_latents with FluxPipeline._prepare_latent_image_ids, the transformer called at timestep / 1000
and, where its config has guidance_embeds (FLUX.1-dev is guidance-distilled), at guidance model.train_guidance
(the script's --guidance_scale 3.5), its output unpacked by FluxPipeline._unpack_latents; target noise - x0.

LoRA goes on the transformer and on CLIP (FluxLoraLoaderMixin's text_encoder), never T5. The LoRA files:
FluxPipeline.save_lora_weights' pytorch_lora_weights.safetensors (diffusers' load_lora_weights) and
pytorch_lora_weights_alpha.safetensors, the same keys with a float `<module>.alpha` tensor per adapted module
(flux_alpha.py: ComfyUI's loader maps these keys and reads alpha only from such tensors).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.maths.flow_timesteps import check_flow_match_scheduler
from gentrain.objectives.adapters.base import PipelineAdapter
from gentrain.objectives.adapters.sd3 import _Routed

MAX_SEQUENCE_LENGTH = 512   # T5 tokens: train_dreambooth_lora_flux.py's --max_sequence_length and the pipeline's default
TRAIN_GUIDANCE = 3.5        # train_dreambooth_lora_flux.py's --guidance_scale ("FLUX.1 dev is guidance distilled")
FLUX_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]   # the script's default --lora_layers


class FluxTransformer(nn.Module):
    """gentrain's denoiser call around a FluxTransformer2DModel: forward(x_t, timestep, emb, pooled) on unpacked
    (B, C, h, w) latents, timestep = sigma * 1000."""

    def __init__(self, model: nn.Module, guidance: float, vae_scale_factor: int):
        super().__init__()
        self.model, self.guidance, self.vae_scale_factor = model, guidance, vae_scale_factor

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None) -> Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise GentrainError(f"config key 'data.image_size': Flux packs 2x2 latent patches; {h}x{w} latents are odd")
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(emb.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = torch.full((b,), self.guidance, device=x.device) if self.model.config.guidance_embeds else None
        out = self.model(hidden_states=packed, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        f = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * f, w * f, f)


class _FluxRouted(_Routed):
    """A routed encoder as FluxPipeline reads it (get_module_execution_device asks its modules and device)."""

    def modules(self) -> Any:
        return self.model.modules()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class _PromptView:
    """The part of a FluxPipeline its encode_prompt reads, with the class's own encode_prompt bound to it."""

    def __init__(self, parts: dict[str, Any], call: Callable[..., Any], device: torch.device):
        from diffusers import FluxPipeline

        self.tokenizer, self.tokenizer_2, self.transformer = parts["tokenizer"], parts["tokenizer_2"], parts["transformer"]
        self.text_encoder = _FluxRouted("text_encoder", parts["text_encoder"], call)
        self.text_encoder_2 = _FluxRouted("text_encoder_2", parts["text_encoder_2"], call)
        self.tokenizer_max_length = int(self.tokenizer.model_max_length)
        self._execution_device = device
        for name in ("encode_prompt", "_get_clip_prompt_embeds", "_get_t5_prompt_embeds"):
            setattr(self, name, getattr(FluxPipeline, name).__get__(self))


class _ZeroT5(nn.Module):
    """T5 in a run on cached encodings (never loaded): previews draw on zero T5 states, as SD3's pipeline does
    without its T5. The cached training states are T5's own."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.anchor = width, nn.Parameter(torch.zeros(()), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False) -> tuple[Tensor]:
        return (torch.zeros(*input_ids.shape, self.width, device=input_ids.device),)


class FluxAdapter(PipelineAdapter):
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_text_encoders = ("text_encoder",)        # FluxLoraLoaderMixin: transformer and CLIP, never T5
    denoiser_targets = FLUX_TARGETS
    cache_unloaded = ("text_encoder_2",)          # T5-XXL: its states come from the cache (cached.py)
    default_guidance = 3.5   # FluxPipeline.__call__'s guidance_scale (pipeline_flux.py, diffusers 0.42.1)
    guidance = TRAIN_GUIDANCE

    def __init__(self, pipe: Any, pretrained: str = ""):
        super().__init__(pipe, pretrained)
        check_flow_match_scheduler(self.parts["scheduler"], pretrained)
        self.vae_scale_factor = int(pipe.vae_scale_factor)

    @classmethod
    def load(cls, m: Any, **kw: Any) -> "FluxAdapter":
        adapter = super().load(m, **kw)
        adapter.guidance = float(getattr(m, "train_guidance", TRAIN_GUIDANCE))
        return adapter

    def kind(self) -> str:
        return "flow"

    def net_latent_channels(self, net: nn.Module) -> int:
        return int(net.config.in_channels) // 4   # 2x2 packed patches

    def wrap(self, net: nn.Module) -> nn.Module:
        return FluxTransformer(net, self.guidance, self.vae_scale_factor)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        """{"emb": (B, 512, joint_attention_dim) T5 states, "pooled": (B, pooled_projection_dim) CLIP's pooled}."""
        device = next(self.parts["text_encoder"].parameters()).device
        emb, pooled, _ = _PromptView(self.parts, call, device).encode_prompt(
            prompt=list(captions), prompt_2=None, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"emb": emb, "pooled": pooled}

    def pipeline_kwargs(self) -> dict[str, Any]:
        if self.parts.get("text_encoder_2") is not None:
            return {}
        return {"text_encoder_2": _ZeroT5(int(self.parts["transformer"].config.joint_attention_dim))}

    def save_lora(self, out: Path, layers: dict[str, dict[str, Tensor]], meta: dict[str, dict]) -> None:
        from gentrain.objectives.adapters.flux_alpha import save_alpha_file

        super().save_lora(out, layers, meta)
        save_alpha_file(out, layers, meta)
