"""The Flux LoRA file with alpha tensors: pytorch_lora_weights_alpha.safetensors, the adapters of
FluxPipeline.save_lora_weights' file under peft names (`transformer.<module>.lora_A.weight`, `.lora_B.weight`,
and `text_encoder.<module>...` for CLIP, as diffusers' training scripts save them) plus one float32 scalar `<net>.<module>.alpha` per adapted module, the
adapter's lora_alpha.

Why a second file: ComfyUI (comfy/lora.py, model_lora_keys_unet: "transformer.<diffusers module>" for Flux;
comfy/weight_adapter/lora.py: the `lora_B`/`lora_A` pair) maps these keys but reads alpha only from a
`<module>.alpha` tensor, and scales by alpha / rank (no tensor: scale 1, wrong unless alpha == rank);
diffusers' own file keeps alpha in its safetensors metadata instead. diffusers' FluxLoraLoaderMixin reads the
alpha tensors as network_alphas, so this file loads in both. CLIP's keys are written under `text_model.` (ComfyUI's
"text_encoder.text_model.encoder.layers.N..."), which diffusers strips where the loaded CLIP has no such level.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

ALPHA_FILE = "pytorch_lora_weights_alpha.safetensors"
PEFT_NAMES = ((".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
              (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."))


def alpha_state_dict(layers: dict[str, dict[str, Tensor]], meta: dict[str, dict]) -> dict[str, Tensor]:
    """`<net>.<module>.lora_A.weight` / `.lora_B.weight` for every adapter weight (peft names: diffusers'
    `lora.down` / `lora_linear_layer.down` are lora_A, `up` lora_B), and `<net>.<module>.alpha` = that net's
    lora_alpha (float32 scalar)."""
    out: dict[str, Tensor] = {}
    for net, sd in layers.items():
        sd = {_peft_name(k): v for k, v in sd.items()}
        if net.startswith("text_encoder"):   # transformers 5's CLIPTextModel has no text_model level; ComfyUI's
            sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}  # keys have it
        alpha, patterns = float(meta[net]["lora_alpha"]), meta[net].get("alpha_pattern") or {}
        if patterns:
            raise ValueError(f"{net}: per-module alpha patterns are not written to the alpha file")
        for key, value in sd.items():
            out[f"{net}.{key}"] = value.contiguous()
            module = key.rsplit(".lora_", 1)[0]
            out[f"{net}.{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _peft_name(key: str) -> str:
    for old, new in PEFT_NAMES:
        key = key.replace(old, new)
    return key


def save_alpha_file(out: Path, layers: dict[str, dict[str, Tensor]], meta: dict[str, dict]) -> Path:
    from safetensors.torch import save_file

    path = Path(out) / ALPHA_FILE
    save_file(alpha_state_dict(layers, meta), str(path))
    return path
