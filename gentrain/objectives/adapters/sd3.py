"""StableDiffusion3Pipeline (SD3 medium, SD3.5 medium/large): an SD3Transformer2DModel (MMDiT) trained by flow
matching on its FlowMatchEulerDiscreteScheduler's shifted sigmas (maths/flow_timesteps.py: the timestep
density and loss weighting of diffusers' SD3 scripts), conditioned on what the pipeline's own encode_prompt
computes: the penultimate states of CLIP-L and CLIP-G side by side, zero-padded to T5's width and followed
by T5's states (the transformer's joint_attention_dim), and the two CLIPs' pooled projections, concatenated.

Prompts encode with T5 padded to 77 tokens, the max_sequence_length of diffusers' train_dreambooth_lora_sd3.py
(the pipeline samples at its own default, 256). The VAE's latents are (z - shift_factor) * scaling_factor
(latent.py). Text-encoder adapters go on the two CLIPs only: SD3's load_lora_weights takes transformer,
text_encoder and text_encoder_2 keys, never T5's. The LoRA file is StableDiffusion3Pipeline.save_lora_weights'
(no kohya file: ComfyUI reads the diffusers file for SD3).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from gentrain.maths.flow_timesteps import check_flow_match_scheduler
from gentrain.objectives.adapters.base import PipelineAdapter

MAX_SEQUENCE_LENGTH = 77   # T5 tokens in training: train_dreambooth_lora_sd3.py's --max_sequence_length default


class SD3Transformer(nn.Module):
    """gentrain's denoiser call around an SD3Transformer2DModel: forward(x_t, timestep, emb, pooled)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None) -> Tensor:
        return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, pooled_projections=pooled,
                          return_dict=False)[0]


class _Routed:
    """A text encoder as encode_prompt calls it, run through the fine-tune's `call` (its trained net where it
    trains, so DDP / DeepSpeed see the call; else frozen under no_grad)."""

    def __init__(self, name: str, model: nn.Module, call: Callable[..., Any]):
        self.name, self.model, self.call = name, model, call

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.call(self.name, *args, **kw)


class _PromptView:
    """The part of a StableDiffusion3Pipeline its encode_prompt reads (tokenizers, encoders, the transformer's
    config), with the pipeline class's own encode_prompt and helpers bound to it."""

    def __init__(self, parts: dict[str, Any], call: Callable[..., Any], device: torch.device):
        from diffusers import StableDiffusion3Pipeline

        for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "transformer"):
            setattr(self, name, parts.get(name))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self, name, None if parts.get(name) is None else _Routed(name, parts[name], call))
        self.tokenizer_max_length = int(self.tokenizer.model_max_length) if self.tokenizer is not None else 77
        self._execution_device = device
        cls = StableDiffusion3Pipeline
        self.encode_prompt = cls.encode_prompt.__get__(self)
        self._get_clip_prompt_embeds = cls._get_clip_prompt_embeds.__get__(self)
        self._get_t5_prompt_embeds = cls._get_t5_prompt_embeds.__get__(self)


class SD3Adapter(PipelineAdapter):
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_text_encoders = ("text_encoder", "text_encoder_2")    # SD3LoraLoaderMixin: the two CLIPs, never T5
    cache_unloaded = ("text_encoder_3", "tokenizer_3")         # T5: its states come from the cache (cached.py)
    default_guidance = 7.0   # StableDiffusion3Pipeline.__call__ (pipeline_stable_diffusion_3.py, diffusers 0.42.1)

    def __init__(self, pipe: Any, pretrained: str = ""):
        super().__init__(pipe, pretrained)
        check_flow_match_scheduler(self.parts["scheduler"], pretrained, dynamic=False)   # SD3 trains a fixed shift

    def kind(self) -> str:
        return "flow"

    def wrap(self, net: nn.Module) -> nn.Module:
        return SD3Transformer(net)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        """{"emb": (B, 77 + 77, joint_attention_dim), "pooled": (B, pooled_projection_dim)}: encode_prompt's
        prompt_embeds and pooled_prompt_embeds, with no negative prompt."""
        device = next(self.parts["text_encoder"].parameters()).device
        emb, _, pooled, _ = _PromptView(self.parts, call, device).encode_prompt(
            prompt=list(captions), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"emb": emb, "pooled": pooled}
