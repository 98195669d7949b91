"""StableDiffusionPipeline (SD-1.x/2.x on the hub; gentrain's own text-to-image exports are such
folders): a UNet2DConditionModel on one text encoder's states, emb = output[0] padded to the
tokenizer's model_max_length, the mask passed iff config.use_attention_mask (BERT-style encoders
of gentrain's exports), as its encode_prompt does; no safety checker."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from gentrain.objectives.adapters.base import PipelineAdapter, tokenize


class SDAdapter(PipelineAdapter):
    pipeline_class = "StableDiffusionPipeline"
    denoiser = "unet"
    text_encoders = lora_text_encoders = ("text_encoder",)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1"}
    default_guidance = 7.5   # StableDiffusionPipeline.__call__ (pipeline_stable_diffusion.py, diffusers 0.42.1)
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def wrap(self, net: nn.Module) -> nn.Module:
        from gentrain.modeling.denoisers import ConditionalUNet

        return ConditionalUNet.wrap(net)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        te = self.parts["text_encoder"]
        ids, mask = tokenize(self.parts["tokenizer"], captions, next(te.parameters()).device)
        use_mask = getattr(te.config, "use_attention_mask", False)
        return {"emb": call("text_encoder", ids, attention_mask=mask if use_mask else None)[0]}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
