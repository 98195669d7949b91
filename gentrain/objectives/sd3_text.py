"""SD3's text conditioning for a from-scratch MMDiT (model.net mmdit): two CLIPTextModelWithProjection
(model.latent.text_encoder = CLIP-L's folder, text_encoder_2 = CLIP-G's) and an optional T5EncoderModel
(text_encoder_3), frozen, encoding captions with StableDiffusion3Pipeline's own encode_prompt (bound to the
parts, adapters/sd3.py's _PromptView): each CLIP's penultimate states, side by side, zero-padded to the
joint width and followed by T5's states (or, without T5, by as many zero states: the pipeline's own
stand-in); the pooled vector is the two CLIPs' projections concatenated. Both CLIPs pad to
model.latent.max_length (their tokenizers' model_max_length, saved so), T5 to the same length (the
pipeline's max_sequence_length at reload). Joint width = T5's d_model, or without T5 the sum of the CLIP
widths; pooled width = the sum of their projection widths. No text mask (the MMDiT attends to all).

This is the conditioning StableDiffusion3Pipeline reproduces, so such a run exports to it
(transformer_exports.py). The states are computed while training: shards with cached text states
(another encoder's) are refused.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.objectives.conditioning import TextConditioning

KEYS = ("model.latent.text_encoder", "model.latent.text_encoder_2", "model.latent.text_encoder_3")


def _load(path: str, key: str, cls_name: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a transformers folder whose saved architecture is cls_name, frozen."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from gentrain.modeling.pretrained import check_pretrained, load_failure

    check_pretrained(path, key)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise load_failure(key, path, e, f"a transformers {cls_name} folder") from None
    saved = list(getattr(config, "architectures", None) or [])
    if cls_name not in saved:
        raise GentrainError(f"config key {key!r}: {path!r} holds a {'/'.join(saved) or config.model_type}, but SD3's "
                            f"conditioning (model.latent.text_encoder_2 set) needs a {cls_name} there")
    model = getattr(transformers, cls_name).from_pretrained(path).eval().requires_grad_(False)
    return model, tokenizer


class SD3TextEncoders(nn.Module):
    """CLIP-L, CLIP-G (with projections) and an optional T5, encoding as StableDiffusion3Pipeline does."""

    def __init__(self, clip_l: str, clip_g: str, t5: Optional[str] = None, max_length: int = 77):
        super().__init__()
        models, self.tokenizers = {}, {}
        for i, (path, name) in enumerate(((clip_l, "text_encoder"), (clip_g, "text_encoder_2"))):
            models[name], tok = _load(path, KEYS[i], "CLIPTextModelWithProjection")
            room = int(models[name].config.max_position_embeddings)
            if max_length > room:
                raise GentrainError(f"config key 'model.latent.max_length': {max_length} tokens, but {path!r} "
                                    f"({KEYS[i]}) has {room} positions")
            tok.model_max_length = max_length   # the pipeline pads CLIP prompts to tokenizer.model_max_length
            self.tokenizers[name] = tok
        self.tokenizers["text_encoder_3"] = None
        if t5:
            models["text_encoder_3"], self.tokenizers["text_encoder_3"] = _load(t5, KEYS[2], "T5EncoderModel")
        self.encoders = nn.ModuleDict(models)
        clip_width = sum(int(models[n].config.hidden_size) for n in ("text_encoder", "text_encoder_2"))
        self.dim = int(models["text_encoder_3"].config.d_model) if t5 else clip_width
        if self.dim < clip_width:
            raise GentrainError(f"config key {KEYS[2]!r}: T5's width {self.dim} (the MMDiT's joint_attention_dim) is "
                                f"below the two CLIP widths together ({clip_width}), which SD3 pads up to it")
        self.pooled_dim = sum(int(models[n].config.projection_dim) for n in ("text_encoder", "text_encoder_2"))
        self.max_length, self.name_or_path = max_length, f"{clip_l} + {clip_g}" + (f" + {t5}" if t5 else "")
        self.model = models["text_encoder"]   # what callers read a dtype/device from

    def parts(self) -> dict[str, Any]:
        """The pipeline's text components: text_encoder(_2, _3) and tokenizer(_2, _3), T5's None when absent."""
        out: dict[str, Any] = {}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            out[name] = self.encoders[name] if name in self.encoders else None
            out[name.replace("text_encoder", "tokenizer")] = self.tokenizers[name]
        return out

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(B, 2 * max_length, dim) states and (B, pooled_dim) pooled vectors: encode_prompt's prompt_embeds and
        pooled_prompt_embeds."""
        from gentrain.objectives.adapters.sd3 import _PromptView

        parts = self.parts()
        parts["transformer"] = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=self.dim))
        device = next(self.encoders.parameters()).device
        view = _PromptView(parts, lambda name, *a, **kw: self.encoders[name](*a, **kw), device)
        emb, _, pooled, _ = view.encode_prompt(prompt=list(captions), prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False, max_sequence_length=self.max_length)
        return emb, pooled


class SD3TextConditioning(TextConditioning):
    """TextConditioning on SD3's encoders: cond = {"emb", "mask" (all ones: no text mask), "pooled"}."""

    def __init__(self, cfg: Any):
        super().__init__(encoder=SD3TextEncoders(cfg.text_encoder, cfg.text_encoder_2, cfg.text_encoder_3 or None,
                                                 cfg.max_length))
        self.pooled_dim = self.text_encoder.pooled_dim

    @torch.no_grad()
    def encode_full(self, prompts: list[str]) -> dict[str, Tensor]:
        emb, pooled = self.text_encoder(prompts)
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        return {"emb": emb.float(), "mask": mask, "pooled": pooled.float()}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        return self.encode_full(prompts)["emb"]

    def text_cond(self, batch: dict[str, Any], dropout: float, rng: Any = None) -> dict[str, Tensor]:
        if "emb" in batch:
            raise GentrainError("SD3's conditioning (model.latent.text_encoder_2) encodes captions while training; "
                                "data.shards holds cached text states: train on the image shards")
        return super().text_cond(batch, dropout, rng)

    def sd3_parts(self) -> dict[str, Any]:
        return self.text_encoder.parts()
