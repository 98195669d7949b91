"""Exports of the text-conditioned latent transformers (model.net pixart / mmdit) as stock diffusers
pipelines, loaded by `DiffusionPipeline.from_pretrained` in a process that never imports gentrain:

  pixart (cross-attention DiT) + AutoencoderKL -> PixArtSigmaPipeline: the text encoder in its T5 slot
      (a BERT-style encoder such as the packaged MiniLM loads with one warning: "Expected types for
      text_encoder: (T5EncoderModel,), got BertModel"), the family's export scheduler (flow:
      DPMSolverMultistepScheduler in its flow form; FlowMatchEulerDiscreteScheduler lacks the
      init_noise_sigma / scale_model_input this pipeline calls). Reload arguments:
      use_resolution_binning=False (the default binning accepts only sample sizes 32/64/128/256),
      max_sequence_length = model.latent.max_length (the pipeline pads to it, default 300),
      clean_caption=False (with bs4 and ftfy installed it would rewrite the prompts).
  mmdit (MMDiT) + AutoencoderKL -> StableDiffusion3Pipeline, only on the text encoders that pipeline's
      encode_prompt runs: two CLIPTextModelWithProjection (model.latent.text_encoder, text_encoder_2) and
      an optional T5 (text_encoder_3); without T5 it reloads with text_encoder_3=None, tokenizer_3=None
      (a plain from_pretrained raises). Call argument: max_sequence_length = model.latent.max_length.
      A MiniLM-conditioned MMDiT has no such pipeline: export refuses it in one line, `gentrain sample`
      draws from it.
The reload arguments are written into gentrain_export.json ("load_kwargs", "call_kwargs").
"""
from __future__ import annotations

from typing import Any

from gentrain.errors import GentrainError


def text_transformer_pipeline(objective: Any, net_name: str, scheduler: Any) -> tuple[Any, dict[str, Any]]:
    """(the stock pipeline, what gentrain_export.json adds) for a pixart or mmdit run."""
    space, cond = objective.space, objective.conditioning
    pipeline = "PixArtSigmaPipeline" if net_name == "pixart" else "StableDiffusion3Pipeline"
    if space.kind != "kl":
        raise GentrainError(f"cannot export model.net={net_name} to {pipeline}: it decodes with an AutoencoderKL "
                            f"(model.latent.autoencoder), this model runs in {space.kind} space")
    net = objective.nets[objective.net_name].model
    if net_name == "pixart":
        return _pixart(space, cond, net, scheduler)
    return _sd3(space, cond, net, scheduler)


def _pixart(space: Any, cond: Any, net: Any, scheduler: Any) -> tuple[Any, dict[str, Any]]:
    from diffusers import PixArtSigmaPipeline

    te = cond.text_encoder
    if space.shift:
        raise GentrainError("cannot export to PixArtSigmaPipeline: it decodes latents / scaling_factor without the "
                            f"autoencoder's shift_factor ({space.shift})")
    pipe = PixArtSigmaPipeline(tokenizer=te.tokenizer, text_encoder=te.model, vae=space.vae, transformer=net,
                               scheduler=scheduler)
    info = {"call_kwargs": {"use_resolution_binning": False, "max_sequence_length": te.max_length,
                            "clean_caption": False}}
    if not getattr(te.tokenizer, "do_lower_case", False):
        info["note"] = ("PixArtSigmaPipeline lowercases and strips prompts; this text encoder's tokenizer is cased, "
                        "so prompts with capitals or outer spaces draw otherwise than in gentrain")
    return pipe, info


def sd3_contract_error(cond: Any) -> str:
    """Why the conditioning cannot run in StableDiffusion3Pipeline ('' when it can)."""
    parts = getattr(cond, "sd3_parts", None)
    if parts is None:
        te = cond.text_encoder
        return (f"cannot export this MMDiT to StableDiffusion3Pipeline: its encode_prompt runs two "
                f"CLIPTextModelWithProjection (and an optional T5), this model is conditioned on {te.name_or_path!r} "
                f"({type(te.model).__name__}, pooled vector = the mean of its token states); train with "
                "model.latent.text_encoder and text_encoder_2 naming two CLIP folders to export, or draw from "
                "this run with `gentrain sample`")
    return ""


def _sd3(space: Any, cond: Any, net: Any, scheduler: Any) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusion3Pipeline

    problem = sd3_contract_error(cond)
    if problem:
        raise GentrainError(problem)
    parts = cond.sd3_parts()
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=scheduler, vae=space.vae, **parts)
    info: dict[str, Any] = {"call_kwargs": {"max_sequence_length": cond.text_encoder.max_length}}
    if parts["text_encoder_3"] is None:
        info["load_kwargs"] = {"text_encoder_3": None, "tokenizer_3": None}
    return pipe, info
