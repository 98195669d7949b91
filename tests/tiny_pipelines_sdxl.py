"""A tiny random-weight StableDiffusionXLPipeline for fine-tune tests, built in code and saved with
save_pretrained once per test session (fixture `tiny_sdxl`). Scaled down as diffusers' own fast tests
scale SDXL (tests/pipelines/stable_diffusion_xl, get_dummy_components: a UNet with the "text_time"
added embedding, addition_time_embed_dim 8, projection_class_embeddings_input_dim = 6 * 8 + the second
CLIP's projection_dim, cross_attention_dim = the two CLIPs' widths together; a CLIPTextModel and a
CLIPTextModelWithProjection; EulerDiscreteScheduler on SD's scaled-linear betas), here on 16-px grey
images (an f2 AutoencoderKL, as the tiny SD pipeline of conftest.py)."""
from pathlib import Path

import pytest

from conftest import make_tiny_clip, make_tiny_vae


def make_tiny_sdxl_pipeline(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    clip, vae = make_tiny_clip(path / "parts" / "clip"), make_tiny_vae(path / "parts" / "vae", 1, (8, 16), 16, 0.13025)
    torch.manual_seed(0)
    second = CLIPTextConfig.from_pretrained(str(clip), projection_dim=16)
    text_encoder_2 = CLIPTextModelWithProjection(second)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 16)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip))
    tokenizer.model_max_length = 16
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    StableDiffusionXLPipeline(vae=AutoencoderKL.from_pretrained(str(vae)), text_encoder=CLIPTextModel.from_pretrained(str(clip)),
                              text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                              scheduler=scheduler).save_pretrained(str(path / "pipe"))
    return path / "pipe"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(root with 48 digits shards at root/digits, the tiny SDXL pipeline folder)."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("sdxl")
    build_source("digits", str(root / "digits"), size=16, count=96, max_samples=48)
    return root, make_tiny_sdxl_pipeline(root)
