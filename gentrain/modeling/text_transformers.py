"""Text-conditioned latent transformers, behind the denoisers' call net(x, timestep, **cond) with the
text conditioning's cond = {"emb": (B, L, D) token states, "mask": (B, L) 1 = token, 0 = padding,
"pooled": (B, D) the caption's one vector}; each net takes what its architecture uses:

- PixArtDenoiser: diffusers PixArtTransformer2DModel (PixArt-alpha/Sigma, Chen et al. 2023/2024): DiT
  blocks with adaLN-single timestep modulation and cross-attention to the text states WITH their mask
  (padding tokens never attended); the caption projection maps the encoder width D to the model width.
  It predicts out_channels = in_channels (no learned variance), called as PixArtSigmaPipeline calls it.
- MMDiTDenoiser: diffusers SD3Transformer2DModel (Esser et al. 2024): joint attention over image and text
  tokens (no text mask: the padding states take part, as SD3 trains), the pooled vector through
  pooled_projections into the timestep modulation. joint_attention_dim = pooled_projection_dim = D.
  With a sentence-transformers encoder (the packaged MiniLM) the pooled vector is its sentence
  embedding: the mask-aware mean over tokens, L2-normalised where its modules.json says so
  (conditioning.pool_tokens).

Sizes come from the config: model.dit_layers (depth), model.dit_heads, model.dit_head_dim (width =
heads * head_dim), model.patch_size; gradient checkpointing per block (model.gradient_checkpointing).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

TEXT_TRANSFORMERS = ("pixart", "mmdit")


class PixArtDenoiser(nn.Module):
    """PixArtTransformer2DModel on (B, C, s, s) latents, cross-attending to (B, L, text_dim) states."""

    def __init__(self, in_channels: int, sample_size: int, text_dim: int, num_layers: int = 4,
                 num_attention_heads: int = 4, attention_head_dim: int = 32, patch_size: int = 2,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        width = num_attention_heads * attention_head_dim
        self.model = PixArtTransformer2DModel(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=in_channels, num_layers=num_layers, cross_attention_dim=width, sample_size=sample_size,
            patch_size=patch_size, caption_channels=text_dim, use_additional_conditions=False)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None) -> Tensor:
        if emb is None:
            raise ValueError("PixArtDenoiser needs text states (emb) and their mask")
        return self.model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=timestep,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


class MMDiTDenoiser(nn.Module):
    """SD3Transformer2DModel on (B, C, s, s) latents, joint attention with (B, L, text_dim) states and
    the (B, text_dim) pooled vector."""

    def __init__(self, in_channels: int, sample_size: int, text_dim: int, num_layers: int = 4,
                 num_attention_heads: int = 4, attention_head_dim: int = 32, patch_size: int = 2,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.model = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, out_channels=in_channels,
            num_layers=num_layers, attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=text_dim, caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=text_dim, pos_embed_max_size=sample_size // patch_size)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None) -> Tensor:
        if emb is None or pooled is None:
            raise ValueError("MMDiTDenoiser needs text states (emb) and the pooled vector (pooled)")
        return self.model(x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=timestep).sample
