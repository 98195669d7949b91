"""A tiny random-weight FluxPipeline (FLUX.1-dev's layout), built offline in code and saved with save_pretrained
once per test session (shared_flux_pipeline), scaled down as diffusers' own fast tests scale Flux
(tests/pipelines/flux/test_pipeline_flux.py: one double and one single block, axes_dims_rope summing to the head
dim, tiny CLIP and T5).

As in FLUX.1-dev: guidance_embeds on, the VAE with shift_factor and scaling_factor (FLUX.1's 0.1159, 0.3611), a
FlowMatchEulerDiscreteScheduler with dynamic shifting (FLUX.1-dev's scheduler config: shift 3.0, base_shift 0.5,
max_shift 1.15, image_seq_len 256..4096), T5's d_model the transformer's joint_attention_dim and CLIP's width its
pooled_projection_dim. The transformer takes 2x2-packed latents: in_channels = 4 x the VAE's latent channels.
The CLIP tokenizer is conftest's character-level vocabulary, T5's tiny_pipelines_sd3's unigram over characters.
"""
from __future__ import annotations

from pathlib import Path

from conftest import make_tiny_clip
from tiny_pipelines_sd3 import T5_DIM, make_tiny_t5

from tiny_pipelines_common import draw_once, shared_pipeline

SIZE = 16          # images (f2 VAE: 8x8 latents, packed 2x2: 16 image tokens)
CLIP_WIDTH = 16    # CLIP-L's hidden = pooled_projection_dim
LATENT = 4         # VAE latent channels (FLUX.1: 16)
FLUX1_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096)


def make_tiny_flux_pipeline(root: Path, channels: int = 1, guidance_embeds: bool = True) -> Path:
    """root/pipe: a FluxPipeline folder on 16-px `channels`-channel images."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    parts = root / "parts"
    clip = make_tiny_clip(parts / "clip_l", hidden=CLIP_WIDTH)
    t5 = make_tiny_t5(parts / "t5")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                         pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=LATENT, norm_num_groups=8, sample_size=SIZE, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER),
                        vae=vae, text_encoder=CLIPTextModel.from_pretrained(str(clip)),
                        tokenizer=CLIPTokenizer.from_pretrained(str(clip), model_max_length=77),
                        text_encoder_2=T5EncoderModel.from_pretrained(str(t5)),
                        tokenizer_2=T5Tokenizer.from_pretrained(str(t5)))
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return root / "pipe"


def shared_flux_pipeline(tmp_path_factory) -> Path:
    """The session's tiny Flux folder, built by the first test module that asks (under pytest's base temp)."""
    return shared_pipeline(tmp_path_factory, "tiny_flux", make_tiny_flux_pipeline)


if __name__ == "__main__":   # build one and draw with it: python tests/tiny_pipelines_flux.py DIR
    import sys

    pipe = draw_once(make_tiny_flux_pipeline, sys.argv[1], SIZE)
