"""StableDiffusionXLPipeline (Podell et al. 2023): a UNet2DConditionModel with the "text_time" added
embedding, on two CLIPs. Prompts encode as its encode_prompt does (and as diffusers'
train_text_to_image_sdxl.py trains): each CLIP's penultimate hidden states, concatenated along the
features, and the pooled (projected) output of the second; a dropped caption conditions on zeros where
the pipeline's force_zeros_for_empty_prompt says its negative prompt is zeros (SDXL base: true).

Micro-conditioning: add_time_ids = (original height, original width, crop top, crop left, target
height, target width) per sample, from the batch's size_crop (data.size_crop, which the fine-tune turns
on: the json's original_width/height, else the stored image's size, and the crop the reader made) and
the training image's size; without size_crop, (H, W, 0, 0, H, W), what the pipeline draws with by default.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from gentrain.objectives.adapters.base import PipelineAdapter, tokenize
from gentrain.objectives.lora import CLIP_TARGETS


class XLUNet(nn.Module):
    """The SDXL UNet behind gentrain's call: forward(x, timestep, emb, pooled, time_ids), as the pipeline calls it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None, pooled: Optional[Tensor] = None,
                time_ids: Optional[Tensor] = None) -> Tensor:
        return self.model(x, timestep, encoder_hidden_states=emb,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def time_ids(batch: dict[str, Any], n: int, device: torch.device) -> Tensor:
    """(n, 6) add_time_ids of a batch of (n, C, H, W) images: size_crop (n, 4) when there, then (H, W)."""
    h, w = batch["image"].shape[-2:]
    target = torch.tensor([[h, w]], dtype=torch.float32, device=device).expand(n, 2)
    if "size_crop" in batch:
        size_crop = torch.as_tensor(batch["size_crop"], device=device).float()
    else:
        size_crop = torch.cat([target, torch.zeros_like(target)], 1)
    return torch.cat([size_crop, target], 1)


class SDXLAdapter(PipelineAdapter):
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser = "unet"
    text_encoders = lora_text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    size_conditioning = True
    default_guidance = 5.0   # StableDiffusionXLPipeline.__call__ (pipeline_stable_diffusion_xl.py, diffusers 0.42.1)

    def wrap(self, net: nn.Module) -> nn.Module:
        return XLUNet(net)

    def encoder_lora_targets(self, name: str, model: nn.Module) -> list[str]:
        """The first CLIP's adapters stop one layer short: SDXL reads its penultimate states, so adapters on its
        last layer would get no gradient (and DDP refuses parameters that get none)."""
        targets = super().encoder_lora_targets(name, model)
        if name != "text_encoder" or targets != CLIP_TARGETS:
            return targets
        last = f".layers.{int(model.config.num_hidden_layers) - 1}."
        return sorted(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets and last not in f".{n}.")

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        states, pooled = [], None
        for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if self.parts.get(name) is None:   # as encode_prompt: a pipeline may come without the first CLIP
                continue
            ids, _ = tokenize(self.parts[tokenizer], captions, next(self.parts[name].parameters()).device)
            out = call(name, ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:   # the projected pooled output (CLIPTextModelWithProjection)
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return {"emb": torch.cat(states, -1), "pooled": pooled}

    def zero_uncond(self) -> bool:
        return bool(self.config.get("force_zeros_for_empty_prompt", True))

    def extras(self, batch: dict[str, Any], x0: Tensor) -> dict[str, Tensor]:
        return {"time_ids": time_ids(batch, x0.shape[0], x0.device)}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": self.zero_uncond()}
