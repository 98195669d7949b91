"""What a pipeline adapter answers: the fine-tune objective (finetune.py) asks it for the loaded
pipeline's parts, which net trains, how prompts encode, the extra conditioning, the stock pipeline
that draws previews and exports, and the LoRA file. One subclass per diffusers pipeline class
(sd.py, sdxl.py, sd3.py), registered in __init__.py. An adapter holds the pipeline's components
(`parts`, frozen where they do not train) and its config; the objective holds the trained nets.

The calls, in the order a run makes them:
  load(m)                  the pipeline from m.pretrained at m.revision (class method; one-line errors)
  kind()                   "epsilon" | "v_prediction" | "flow": which maths trains it (the scheduler's)
  wrap(net)                the denoiser behind gentrain's call signature: forward(x_t, timestep, **cond)
  encoder_lora_targets(name, model)  model.text_encoder_lora's default targets on encoder `name`
  encode(captions, call)   the cond kwargs of the captions, as the pipeline's encode_prompt computes
                           them; call(name, *args, **kw) runs the text encoder `name` (through its
                           trained net where it trains, so DDP / DeepSpeed see the call)
  zero_uncond()            True: a dropped caption conditions on zeros (SDXL's force_zeros_for_empty_prompt)
  extras(batch, x0)        per-sample conditioning beside the text (SDXL's add_time_ids)
  pipeline(**trained)      the stock pipeline on the parts, the trained nets put in place
  save_lora(out, ...)      the class's own save_lora_weights
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.objectives.lora import UNET_TARGETS, text_encoder_targets


def scheduler_kind(scheduler: Any) -> str:
    """'flow', or the VP scheduler's prediction type."""
    c = scheduler.config
    if c.get("use_flow_sigmas") or c.get("prediction_type") == "flow_prediction" or \
            type(scheduler).__name__.startswith("FlowMatch"):
        return "flow"
    return c.get("prediction_type", "epsilon")


def tokenize(tokenizer: Any, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) padded to the tokenizer's model_max_length, as encode_prompt pads."""
    tok = tokenizer(captions, padding="max_length", max_length=int(tokenizer.model_max_length), truncation=True,
                    return_tensors="pt")
    return tok.input_ids.to(device), tok.attention_mask.to(device)


class TrainableTextEncoder(nn.Module):
    """A text encoder with adapters, trained: the objective's net of the encoder's name; calls go to the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kw: Any) -> Any:
        return self.model(*args, **kw)


class PipelineAdapter:
    pipeline_class = ""                            # the model_index.json _class_name served
    denoiser = "unet"                              # the part that trains: "unet" | "transformer"
    text_encoders: tuple[str, ...] = ("text_encoder",)        # every encoder prompts go through (held frozen)
    lora_text_encoders: tuple[str, ...] = ("text_encoder",)   # those model.text_encoder_lora adapts: the ones the
                                                              # class's load_lora_weights accepts
    denoiser_targets: list[str] = UNET_TARGETS     # model.lora's default target modules
    kohya_prefixes: dict[str, str] = {}            # net -> kohya key prefix; empty: no kohya file for the class
    size_conditioning = False                      # the batches carry size_crop (data.size_crop, decode.py)
    load_kwargs: dict[str, Any] = {}               # from_pretrained's extra arguments
    cache_unloaded: tuple[str, ...] = ()           # parts a run on cached encodings never loads (cached.py)
    default_guidance = 7.5                         # previews and eval: the class's __call__ guidance_scale default

    def __init__(self, pipe: Any, pretrained: str = ""):
        self.parts: dict[str, Any] = dict(pipe.components)
        self.config = dict(pipe.config)
        self.pretrained = pretrained

    @classmethod
    def load(cls, m: Any, **kw: Any) -> "PipelineAdapter":
        import diffusers

        try:
            pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(m.pretrained, revision=m.revision,
                                                                          **{**cls.load_kwargs, **kw})
        except (OSError, ValueError) as e:
            raise GentrainError(f"config key 'model.pretrained': cannot load {m.pretrained!r} "
                                f"({str(e).splitlines()[0]})") from None
        return cls(pipe, m.pretrained)

    def kind(self) -> str:
        return scheduler_kind(self.parts["scheduler"])

    def wrap(self, net: nn.Module) -> nn.Module:
        raise NotImplementedError

    def encoder_lora_targets(self, name: str, model: nn.Module) -> list[str]:
        return text_encoder_targets(model)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def zero_uncond(self) -> bool:
        return False

    def extras(self, batch: dict[str, Any], x0: Tensor) -> dict[str, Tensor]:
        return {}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}

    def pipeline(self, **trained: nn.Module) -> Any:
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class)(**{**self.parts, **trained, **self.pipeline_kwargs()})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_lora(self, out: Path, layers: dict[str, dict[str, Tensor]], meta: dict[str, dict]) -> None:
        """Each adapted net's layers (diffusers keys) and peft config through the class's save_lora_weights."""
        import diffusers

        kw = {f"{name}_lora_layers": sd for name, sd in layers.items()}
        kw.update({f"{name}_lora_adapter_metadata": meta[name] for name in layers})
        getattr(diffusers, self.pipeline_class).save_lora_weights(str(out), safe_serialization=True, **kw)
