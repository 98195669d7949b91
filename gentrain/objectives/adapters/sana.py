"""SanaPipeline (Sana 0.6B / 1.6B): a SanaTransformer2DModel (linear-attention DiT) on an AutoencoderDC's 32x
compressed latents, conditioned on the last hidden states of a Gemma-2 decoder and their attention mask, both
as the pipeline's own encode_prompt computes them (the first token and the last max_sequence_length - 1 kept);
the mask reaches the transformer's cross-attention as `encoder_attention_mask`.

Training follows diffusers' examples/dreambooth/train_dreambooth_lora_sana.py: prompts encoded with
--max_sequence_length 300 and --complex_human_instruction None (its defaults; the pipeline's __call__ prepends
its complex human instruction unless told not to, so gentrain's previews and the exported LoRA draw with
complex_human_instruction=None, as the script's validation does), latents AutoencoderDC.encode(x).latent times
its scaling_factor (latent.py), and flow matching on the grid of a FlowMatchEulerDiscreteScheduler built from
the pipeline's scheduler folder, as the script builds it: that folder holds a DPMSolverMultistepScheduler whose
`flow_shift` is not FlowMatchEuler's `shift`, so the training sigmas are unshifted (shift 1) while previews and
exports sample with the shipped DPM-Solver and its flow_shift. The velocity target, the script's density and
weighting keys (its default --weighting_scheme is "none") come from flow_weighting.py.

LoRA goes on the transformer only: SanaLoraLoaderMixin's load_lora_weights takes transformer keys alone, so
model.text_encoder_lora is refused (base.py). The LoRA file is SanaPipeline.save_lora_weights' (no kohya file).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.objectives.adapters.base import PipelineAdapter
from gentrain.objectives.adapters.sd3 import _Routed

MAX_SEQUENCE_LENGTH = 300            # train_dreambooth_lora_sana.py --max_sequence_length default (the pipeline's too)
COMPLEX_HUMAN_INSTRUCTION = None     # the script's --complex_human_instruction default: none, in training and sampling
LORA_TARGETS = ["to_k", "to_q", "to_v"]   # the script's target_modules without --lora_layers (attn1 and attn2)


class SanaTransformer(nn.Module):
    """gentrain's denoiser call around a SanaTransformer2DModel: forward(x_t, timestep, emb, mask)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        # the pipeline calls the transformer with t * timestep_scale (1.0 for Sana 0.6B/1.6B, as the script assumes)
        scale = float(self.model.config.get("timestep_scale", 1.0))
        return self.model(hidden_states=x, encoder_hidden_states=emb, encoder_attention_mask=mask,
                          timestep=timestep * scale if scale != 1.0 else timestep, return_dict=False)[0]


class _PromptView:
    """The part of a SanaPipeline its encode_prompt reads (tokenizer, Gemma), with the class's own methods bound."""

    def __init__(self, parts: dict[str, Any], call: Callable[..., Any], device: torch.device):
        from diffusers import SanaPipeline

        self.tokenizer = parts["tokenizer"]
        self.text_encoder = _Routed("text_encoder", parts["text_encoder"], call)
        self._execution_device = device
        for name in ("encode_prompt", "_get_gemma_prompt_embeds", "_text_preprocessing", "_clean_caption"):
            setattr(self, name, getattr(SanaPipeline, name).__get__(self))


class SanaAdapter(PipelineAdapter):
    pipeline_class = "SanaPipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder",)
    lora_text_encoders = ()                     # SanaLoraLoaderMixin: transformer only
    default_guidance = 4.5   # SanaPipeline.__call__'s guidance_scale (pipeline_sana.py, diffusers 0.42.1)
    denoiser_targets = LORA_TARGETS

    def __init__(self, pipe: Any, pretrained: str = ""):
        super().__init__(pipe, pretrained)
        scheduler = self.parts["scheduler"]
        if self.kind() != "flow":
            raise GentrainError(f"config key 'model.pretrained': {pretrained!r} has a {type(scheduler).__name__} "
                                "without flow sigmas; Sana fine-tuning trains flow matching")

    def training_sigmas(self) -> Any:
        """The scheduler config the script's FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler")
        reads: the shipped DPM-Solver's, whose flow_shift FlowMatchEuler does not read (shift 1)."""
        return self.parts["scheduler"].config

    def wrap(self, net: nn.Module) -> nn.Module:
        return SanaTransformer(net)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        """{"emb": (B, 300, caption_channels) Gemma states, "mask": (B, 300)}: encode_prompt's prompt_embeds
        and prompt_attention_mask, with no negative prompt."""
        device = next(self.parts["text_encoder"].parameters()).device
        emb, mask, _, _ = _PromptView(self.parts, call, device).encode_prompt(
            list(captions), do_classifier_free_guidance=False, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH,
            complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION)
        return {"emb": emb, "mask": mask}

    def call_kwargs(self, prompts: list[str], scale: float) -> dict[str, Any]:
        """Drawing as trained: no complex human instruction, 300 tokens, at the asked size (no aspect-ratio bins)."""
        return {**super().call_kwargs(prompts, scale), "complex_human_instruction": COMPLEX_HUMAN_INSTRUCTION,
                "max_sequence_length": MAX_SEQUENCE_LENGTH, "use_resolution_binning": False}
