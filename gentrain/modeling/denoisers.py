"""Denoisers for image/latent models, diffusers networks behind one call signature,
net(x, timestep, **cond) -> prediction, so objectives treat toy MLPs, UNets and DiTs alike:

- ConditionalUNet: UNet2DConditionModel, cross-attention on text embeddings, cond = {"emb": (B, L, D)}
  (the text "mask" and "pooled" are accepted and unused); called exactly as StableDiffusionPipeline calls
  it (no encoder attention mask: the pipeline passes none);
- PixelUNet: UNet2DModel, unconditional (DDPMPipeline's network), cond = {};
- the text transformers (PixArt cross-attention DiT, SD3's MMDiT) are text_transformers.py's;
- ClassDiT: DiTTransformer2DModel (Peebles & Xie 2023), adaLN-zero class conditioning, cond = {"labels": (B,)}.
  DiTPipeline hard-codes the null class 1000, so the table has num_embeds_ada_norm=1000 (+1 null) rows.
  diffusers drops labels inside every block independently while training; gentrain turns that off and
  drops labels once per sample in the objective, the same label for every block (as the paper does).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

DIT_NULL_CLASS = 1000   # DiTPipeline's hard-coded unconditional label


def _down_up(n: int, attention: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The highest resolution without attention (cheap), (cross-)attention below it, as SD does."""
    if attention:
        return ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1), ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return ("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1), ("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)


class ConditionalUNet(nn.Module):
    """UNet2DConditionModel; cross-attention on text embeddings (B, L, D) when given."""

    def __init__(self, in_channels: int, sample_size: int, block_out_channels: list[int], cross_attention_dim: int,
                 layers_per_block: int = 1, attention_head_dim: int = 8, norm_num_groups: int = 32,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from diffusers import UNet2DConditionModel

        down, up = _down_up(len(block_out_channels), attention=True)
        self.model = UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, down_block_types=down,
            up_block_types=up, block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    @classmethod
    def wrap(cls, unet: nn.Module) -> "ConditionalUNet":
        """The same call signature around a UNet2DConditionModel already built (e.g. a pipeline's)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model = unet
        return self

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                pooled: Optional[Tensor] = None) -> Tensor:
        """The text mask and pooled vector are not used: StableDiffusionPipeline passes neither."""
        return self.model(x, timestep, encoder_hidden_states=emb).sample


class PixelUNet(nn.Module):
    """UNet2DModel, unconditional: the network DDPMPipeline runs."""

    def __init__(self, in_channels: int, sample_size: int, block_out_channels: list[int], layers_per_block: int = 1,
                 attention_head_dim: int = 8, norm_num_groups: int = 32, gradient_checkpointing: bool = False):
        super().__init__()
        from diffusers import UNet2DModel

        down, up = _down_up(len(block_out_channels), attention=False)
        self.model = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                 down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
                                 layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
                                 norm_num_groups=norm_num_groups)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        return self.model(x, timestep).sample


class ClassDiT(nn.Module):
    """DiTTransformer2DModel on (B, C, s, s) latents with class labels in [0, num_classes) or the null 1000."""

    def __init__(self, in_channels: int, sample_size: int, num_layers: int = 4, num_attention_heads: int = 4,
                 attention_head_dim: int = 32, patch_size: int = 1, gradient_checkpointing: bool = False):
        super().__init__()
        from diffusers import DiTTransformer2DModel
        from diffusers.models.embeddings import LabelEmbedding

        self.model = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=in_channels, num_layers=num_layers, sample_size=sample_size, patch_size=patch_size,
            num_embeds_ada_norm=DIT_NULL_CLASS)
        for m in self.model.modules():
            if isinstance(m, LabelEmbedding):
                m.dropout_prob = 0.0   # keeps the null row; the objective drops labels once per sample
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def forward(self, x: Tensor, timestep: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if labels is None:
            raise ValueError("ClassDiT needs class labels (the null class is 1000)")
        return self.model(x, timestep=timestep, class_labels=labels).sample
