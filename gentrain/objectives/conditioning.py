"""What a model is conditioned on: one module for the latent families (diffusion, flow, fine-tune)
and the GANs.

One of:
- text: captions through a frozen text encoder. The denoisers take {"emb": (B, L, D) token states,
  "mask": (B, L) their attention mask, "pooled": (B, D) the caption's vector (pool_tokens)}, each net
  the keys it uses (the UNet only emb; PixArt emb + mask; the MMDiT emb + pooled), with
  classifier-free guidance dropout (Ho & Salimans 2022) whose unconditional states, mask and pooled
  vector are exactly what the encoder computes for "" (TextConditioning); the GANs take the token
  states and their mask, {"text": (B, L, D), "text_mask": (B, L)}, each distinct caption encoded
  once and kept, since a dataset's training captions repeat (MaskedTextConditioning);
- class: integer labels (the shards' json `label`), dropped to a null class for guidance where
  there is one (DiTPipeline's 1000);
- none: unconditional;
- image: an image-to-image model's input image (ImageInput: its families read the image themselves).
The first three each turn a training batch into the net's keyword arguments (`train`) and a
sampling request (`{"prompts": [...]}` or `{"labels": [...]}`) into (cond, uncond) keyword
arguments (`request`; uncond is None where nothing guides). `kind` names which it is: the CLI,
eval and exports read it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from gentrain.errors import GentrainError
from gentrain.maths.rng import BatchRNG


def pool_tokens(emb: Tensor, mask: Tensor, normalize: bool = False) -> Tensor:
    """(B, D): the mean of the states over the caption's tokens (mask 1), as sentence-transformers'
    mean Pooling computes a sentence embedding, L2-normalised when the encoder's pipeline has a
    Normalize module (the packaged MiniLM's does)."""
    m = mask.to(emb.dtype).unsqueeze(-1)
    pooled = (emb * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class TextConditioning:
    kind = "text"

    def __init__(self, cfg: Any = None, encoder: Any = None):
        """From cfg's text_encoder and max_length (a LatentConfig), or an encoder already built
        (FrozenTextEncoder)."""
        from gentrain.modeling.text_encoders import FrozenTextEncoder

        self.text_encoder = encoder or FrozenTextEncoder(cfg.text_encoder, max_length=cfg.max_length)
        self.dim = self.text_encoder.dim
        self._uncond: Optional[dict[str, Tensor]] = None

    def to(self, device: torch.device) -> "TextConditioning":
        self.text_encoder.to(device)
        self._uncond = None
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"emb": (n, L, D) float, "mask": (n, L), "pooled": (n, D)} of the prompts, encoded now."""
        emb, mask = self.text_encoder(prompts)
        return self.complete(emb.float(), mask)

    def complete(self, emb: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"emb": emb, "mask": mask, "pooled": pool_tokens(emb, mask, getattr(self.text_encoder, "normalize", False))}

    def uncond(self, n: int) -> dict[str, Tensor]:
        """n copies of the encoding of "" (states, mask, pooled), as the pipeline's encode_prompt computes it."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()}

    @torch.no_grad()
    def text(self, batch: dict[str, Any], dropout: float, rng: Optional[BatchRNG] = None) -> dict[str, Tensor]:
        """Caption states and masks (cached or encoded now) with their pooled vectors; each caption
        replaced by the "" encoding (states, mask and pooled vector) with prob. dropout."""
        if "emb" in batch:
            emb = batch["emb"].float()
            mask = batch["mask"] if "mask" in batch else torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
            out = self.complete(emb, mask.to(emb.device))
        else:
            out = self.encode_prompts(list(batch["txt"]))
        if dropout > 0:
            emb = out["emb"]
            drop = (rng or BatchRNG()).rand(emb.shape[0], device=emb.device) < dropout
            un = self.uncond(emb.shape[0])
            out = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), un[k].to(v.dtype), v) for k, v in out.items()}
        return out

    def train(self, batch: dict[str, Any], dropout: float = 0.0, rng: Optional[BatchRNG] = None) -> dict[str, Tensor]:
        return self.text(batch, dropout, rng)

    def prompts(self, cond: Optional[dict], n: int) -> list[str]:
        prompts = (cond or {}).get("prompts")
        if prompts is None or len(prompts) != n:
            raise GentrainError(f"a text-conditioned model needs cond={{'prompts': [{n} prompts]}}")
        return list(prompts)

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, Optional[dict]]:
        return self.encode_prompts(self.prompts(cond, n)), self.uncond(n)

    def preview_request(self, batch: dict[str, Any]) -> dict:
        return {"prompts": list(batch["txt"][:8])}

    @staticmethod
    def captions(request: dict) -> list[str]:
        return list(request["prompts"])


class MaskedTextConditioning(TextConditioning):
    """The GANs' text: token states and mask, each distinct caption encoded once and kept (cleared
    when the encoder moves). No dropout: nothing guides a GAN."""

    def __init__(self, encoder: Any):
        super().__init__(encoder=encoder)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def to(self, device: torch.device) -> "MaskedTextConditioning":
        super().to(device)
        self._cache.clear()
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        new = sorted({p for p in prompts if p not in self._cache})
        if new:
            emb, mask = self.text_encoder(new)
            self._cache.update({p: (e, k) for p, e, k in zip(new, emb.float(), mask)})
        return {"text": torch.stack([self._cache[p][0] for p in prompts]),
                "text_mask": torch.stack([self._cache[p][1] for p in prompts])}

    def train(self, batch: dict[str, Any], dropout: float = 0.0, rng: Optional[BatchRNG] = None) -> dict[str, Tensor]:
        return self.encode(list(batch["txt"]))

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, None]:
        return self.encode(self.prompts(cond, n)), None


class ClassConditioning:
    kind = "class"
    dim = 0
    text_encoder = None

    def __init__(self, num_classes: int, names: Sequence[str] = (), *, null: Optional[int] = None,
                 key: str = "model.latent.num_classes"):
        """Labels in [0, num_classes) (config key `key`); `null` is the class a dropped label becomes
        (None: no dropout, no unconditional request)."""
        self.num_classes, self.null, self.key = num_classes, null, key
        self.names = list(names) or [str(i) for i in range(num_classes)]
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> "ClassConditioning":
        self.device = torch.device(device)
        return self

    def labels(self, labels: Any, where: str) -> Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise GentrainError(f"{where}: class label {int(labels[bad][0])} is outside [0, {self.num_classes}) "
                                f"({self.key})")
        return labels

    def train(self, batch: dict[str, Any], dropout: float = 0.0, rng: Optional[BatchRNG] = None) -> dict[str, Tensor]:
        if "label" not in batch:
            raise GentrainError("a class-conditional model needs a `label` in each sample (the shards' json)")
        labels = self.labels(batch["label"], f"a training batch (sample {batch.get('key', ['?'])[0]})")
        if dropout > 0:
            drop = (rng or BatchRNG()).rand(labels.shape[0], device=labels.device) < dropout
            labels = torch.where(drop, self.null, labels)
        return {"labels": labels}

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, Optional[dict]]:
        labels = (cond or {}).get("labels")
        if labels is None or len(labels) != n:
            raise GentrainError(f"a class-conditional model needs cond={{'labels': [{n} class ids]}}")
        uncond = None if self.null is None else {"labels": torch.full((n,), self.null, device=self.device)}
        return {"labels": self.labels(labels, "sampling")}, uncond

    def preview_request(self, batch: dict[str, Any]) -> dict:
        return {"labels": [i % self.num_classes for i in range(min(self.num_classes, 10) * 2)]}

    def captions(self, request: dict) -> list[str]:
        return [self.names[int(i)] for i in request["labels"]]


class NoConditioning:
    kind = "none"
    dim = 0
    text_encoder = None

    def to(self, device: torch.device) -> "NoConditioning":
        return self

    def train(self, batch: dict[str, Any], dropout: float = 0.0, rng: Optional[BatchRNG] = None) -> dict:
        return {}

    def request(self, cond: Optional[dict], n: int) -> tuple[dict, None]:
        return {}, None

    def preview_request(self, batch: dict[str, Any]) -> None:
        return None


class ImageInput:
    """What an image-to-image model (Pix2Pix, CycleGAN) is conditioned on: the input image, given to
    `sample` as cond={"input": (n, C, H, W)}."""
    kind = "image"
    dim = 0
    text_encoder = None


def make_conditioning(cfg: Any) -> Any:
    """The denoisers' conditioning from model.latent (text_encoder, num_classes, class_names, max_length)."""
    from gentrain.modeling.denoisers import DIT_NULL_CLASS

    if cfg.text_encoder and cfg.num_classes:
        raise GentrainError("config keys 'model.latent.text_encoder' and 'model.latent.num_classes' exclude each other")
    if cfg.text_encoder:
        return TextConditioning(cfg)
    if cfg.num_classes:
        if not 0 < cfg.num_classes <= DIT_NULL_CLASS:
            raise GentrainError(f"config key 'model.latent.num_classes': {cfg.num_classes} must be in [1, {DIT_NULL_CLASS}]")
        if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
            raise GentrainError(f"config key 'model.latent.class_names': {len(cfg.class_names)} names for "
                                f"{cfg.num_classes} classes")
        return ClassConditioning(cfg.num_classes, cfg.class_names, null=DIT_NULL_CLASS)
    return NoConditioning()


def gan_conditioning(m: Any) -> Any:
    """A GAN's conditioning from model.condition (none | class | text), num_classes, text_encoder, max_length."""
    if m.condition == "class":
        return ClassConditioning(m.num_classes, key="model.num_classes")
    if m.condition == "text":
        from gentrain.modeling.text_encoders import FrozenTextEncoder

        return MaskedTextConditioning(FrozenTextEncoder(m.text_encoder, max_length=m.max_length, key="model.text_encoder"))
    return NoConditioning()
