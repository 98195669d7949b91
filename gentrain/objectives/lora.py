"""LoRA / DoRA adapters (peft) for a fine-tune: their config, putting them on a model, turning
them on and off, the text encoders' default targets, and the kohya-format export (A1111/ComfyUI)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
LORA_FILE, KOHYA_FILE = "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"


@dataclass
class LoraSpec:
    rank: int = 0                      # 0: no adapter (the UNet: a full fine-tune; the text encoder: frozen)
    alpha: Optional[float] = None      # lora_alpha; scale = alpha / rank (null: alpha = rank)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)   # module names; [] = the defaults for the network
    use_dora: bool = False             # weight-decomposed LoRA (Liu et al. 2024)


def lora_config(spec: LoraSpec, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, lora_dropout=spec.dropout,
                      target_modules=list(spec.targets or targets), use_dora=spec.use_dora,
                      init_lora_weights="gaussian")


def add_lora(model: nn.Module, spec: LoraSpec, defaults: list[str], key: str) -> None:
    """peft adapters on `model` (frozen first); targets that match no module are one error listing
    the model's Linear/Conv names. A diffusers model through its own `add_adapter`; a transformers
    text encoder through peft directly (transformers' mixin wants a newer peft than PyPI has here)."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    config = lora_config(spec, defaults)
    try:
        if type(model).__module__.startswith("diffusers"):
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model, adapter_name="default")
            model.peft_config = {"default": config}
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                        if isinstance(mod, (nn.Linear, nn.Conv2d))})
        raise GentrainError(f"config key 'model.{key}.targets': {list(spec.targets or defaults)} match no module of "
                            f"{type(model).__name__} ({str(e).splitlines()[0][:120]}); its Linear/Conv names: "
                            f"{', '.join(names)}") from None


def set_adapters(model: nn.Module, enabled: bool) -> None:
    """Every peft layer of `model` on or off (the base model when off)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


def text_encoder_targets(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if {"q_proj", "v_proj"} <= names:
        return CLIP_TARGETS
    if {"query", "value"} <= names:
        return BERT_TARGETS
    return []   # add_lora then lists the modules there are


KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def save_kohya(layers: dict[str, dict[str, Tensor]], meta: dict[str, dict], path: Path,
               prefixes: Optional[dict[str, str]] = None) -> None:
    """diffusers' PEFT -> kohya conversion, with each module's true alpha (diffusers writes alpha = rank).
    `prefixes`: each net's kohya key prefix, as the conversion writes them (SD-1.x/2.x: lora_unet,
    lora_te1; SDXL adds its second CLIP as lora_te2)."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya: dict[str, Tensor] = {}
    for name, sd in layers.items():  # one net at a time: converted together, UNet keys came out in an old style
        kohya.update(convert_state_dict_to_kohya(convert_all_state_dict_to_peft({f"{name}.{k}": v for k, v in sd.items()})))
    prefix = prefixes or KOHYA_PREFIXES
    for k in list(kohya):
        if k.endswith(".alpha"):
            name = next(n for n, p in prefix.items() if k.startswith(p + "_") or k.startswith(p + "."))
            kohya[k] = torch.tensor(float(meta[name]["lora_alpha"]), dtype=kohya[k].dtype)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path),
              metadata={"ss_network_module": "networks.lora", "gentrain_alpha": json.dumps(
                  {n: meta[n]["lora_alpha"] for n in meta})})
