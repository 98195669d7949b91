"""Denoisers for image/latent models: diffusers UNet2DConditionModel behind a wrapper with one
call signature, net(x, timestep, emb=None) -> prediction, so objectives treat toy MLPs and UNets
alike. The UNet is called exactly as diffusers pipelines call it (no encoder attention mask:
StableDiffusionPipeline passes none), so an export samples what was trained."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class ConditionalUNet(nn.Module):
    """UNet2DConditionModel; cross-attention on text embeddings (B, L, D) when given."""

    def __init__(self, in_channels: int, sample_size: int, block_out_channels: list[int], cross_attention_dim: int,
                 layers_per_block: int = 1, attention_head_dim: int = 8, norm_num_groups: int = 32,
                 gradient_checkpointing: bool = False):
        super().__init__()
        from diffusers import UNet2DConditionModel

        n = len(block_out_channels)
        # the highest resolution without attention (cheap), cross-attention below it, as SD does
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
        self.model = UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, down_block_types=down,
            up_block_types=up, block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def forward(self, x: Tensor, timestep: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        return self.model(x, timestep, encoder_hidden_states=emb).sample
