"""What a pipeline adapter answers: the fine-tune objective (finetune.py) asks it for the loaded
pipeline's parts, which net trains, how prompts encode, the extra conditioning, the stock pipeline
that draws previews and exports, and the LoRA file. One subclass per diffusers pipeline class
(sd.py, sdxl.py, sd3.py), registered in __init__.py. An adapter holds the pipeline's components
(`parts`, frozen where they do not train) and its config; the objective holds the trained nets.

The calls, in the order a run makes them:
  load(m)                  the pipeline from m.pretrained at m.revision (class method; one-line errors)
  latent_space(size, ch)   the frozen VAE's latent space (latent.py), checked against the data and the denoiser
  kind()                   "epsilon" | "v_prediction" | "flow": which maths trains it (the scheduler's)
  wrap(net)                the denoiser behind gentrain's call signature: forward(x_t, timestep, **cond)
  net_latent_channels(net) the VAE latent channels the denoiser takes (the shared fit check)
  encoder_lora_targets(name, model)  model.text_encoder_lora's default targets on encoder `name`
  encode(captions, call)   the cond kwargs of the captions, as the pipeline's encode_prompt computes
                           them; call(name, *args, **kw) runs the text encoder `name` (through its
                           trained net where it trains, so DDP / DeepSpeed see the call)
  zero_uncond()            True: a dropped caption conditions on zeros (SDXL's force_zeros_for_empty_prompt)
  training_sigmas()        the scheduler config whose FlowMatchEulerDiscreteScheduler grid trains a flow pipeline
                           (diffusers' scripts build one from the scheduler folder), or None: the flow family's own
  extras(batch, x0)        per-sample conditioning beside the text (SDXL's add_time_ids)
  pipeline(**trained)      the stock pipeline on the parts, the trained nets put in place
  call_kwargs(prompts, s)  the pipeline call's prompt and guidance arguments (previews, eval) at scale s
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

        te_lora = getattr(m, "text_encoder_lora", None)
        if te_lora is not None and te_lora.rank and not cls.lora_text_encoders:
            raise GentrainError(f"config key 'model.text_encoder_lora.rank': {cls.pipeline_class}'s load_lora_weights "
                                f"takes {cls.denoiser} adapters only; set model.text_encoder_lora.rank=0")
        try:
            pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(m.pretrained, revision=m.revision,
                                                                          **{**cls.load_kwargs, **kw})
        except (OSError, ValueError) as e:
            raise GentrainError(f"config key 'model.pretrained': cannot load {m.pretrained!r} "
                                f"({str(e).splitlines()[0]})") from None
        return cls(pipe, m.pretrained)

    def latent_space(self, image_size: int, channels: int) -> Any:
        """The VAE's latents (z - shift_factor) * scaling_factor, after the shared fit check (latent.py)."""
        from gentrain.objectives.latent import LatentSpace, check_autoencoder_fit

        vae, net = self.parts["vae"], self.parts[self.denoiser]
        check_autoencoder_fit(vae.config, channels=channels, image_size=image_size, key="model.pretrained",
                              net_in_channels=self.net_latent_channels(net))
        return LatentSpace.from_vae(vae, image_size, channels)

    def kind(self) -> str:
        return scheduler_kind(self.parts["scheduler"])

    def wrap(self, net: nn.Module) -> nn.Module:
        raise NotImplementedError

    def net_latent_channels(self, net: nn.Module) -> int:
        """The latent channels the denoiser takes (Flux / Qwen-Image pack 2x2 patches: in_channels / 4)."""
        return int(net.config.in_channels)

    def encoder_lora_targets(self, name: str, model: nn.Module) -> list[str]:
        return text_encoder_targets(model)

    def encode(self, captions: list[str], call: Callable[..., Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def zero_uncond(self) -> bool:
        return False

    def training_sigmas(self) -> Any:
        scheduler = self.parts["scheduler"]
        return scheduler.config if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" else None

    def extras(self, batch: dict[str, Any], x0: Tensor) -> dict[str, Tensor]:
        return {}

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {}

    def call_kwargs(self, prompts: list[str], scale: float) -> dict[str, Any]:
        return {"prompt": prompts, "guidance_scale": scale}

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
