"""A tiny random-weight StableDiffusion3Pipeline, built offline in code and saved with save_pretrained once per
test session (shared_sd3_pipeline), scaled down as diffusers' own fast tests scale SD3: one transformer block,
2-layer CLIPs, a 1-layer T5.

The two CLIPs differ in width (CLIP-L 16, CLIP-G 32; projections 16 and 32, so pooled_projection_dim 48)
and T5's d_model (64) is the transformer's joint_attention_dim, as in SD3 (768 + 1280 -> 2048 pooled,
T5 4096 = joint_attention_dim): encode_prompt pads the CLIP states (16 + 32 = 48) to 64 beside T5's.
The VAE carries a shift_factor, the scheduler SD3's shift 3.0. The CLIP tokenizers are conftest's
character-level CLIP vocabulary; T5's is a sentencepiece-style unigram over single characters.
"""
from __future__ import annotations

import string
from pathlib import Path

from conftest import make_tiny_clip

from tiny_pipelines_common import draw_once, shared_pipeline

SIZE = 16                 # images (f2 VAE: 8x8 latents, patch 2: 16 image tokens)
T5_DIM = 64               # T5 d_model = the transformer's joint_attention_dim
CLIP_WIDTHS = (16, 32)    # CLIP-L, CLIP-G hidden = projection widths


def make_tiny_t5(path: Path) -> Path:
    """A 1-layer T5EncoderModel and a T5 tokenizer (unigram over characters, Metaspace, '</s>' appended)."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    pieces = ["\u2581" + c for c in string.ascii_lowercase + string.digits] + \
        list(string.ascii_letters + string.digits + string.punctuation) + ["\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(str(path))
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=len(vocab), d_model=T5_DIM, d_ff=64, d_kv=16, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


def make_tiny_clip_with_projection(path: Path, hidden: int, seed: int) -> Path:
    """conftest's tiny CLIP folder, its model rebuilt as CLIPTextModelWithProjection (projection = hidden)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    make_tiny_clip(path, hidden=hidden)
    cfg = CLIPTextConfig.from_pretrained(str(path))
    cfg.projection_dim, cfg.num_attention_heads = hidden, 2
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


def make_tiny_sd3_pipeline(root: Path, channels: int = 1) -> Path:
    """root/pipe: a StableDiffusion3Pipeline folder on 16-px `channels`-channel images."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    parts = root / "parts"
    clip_l = make_tiny_clip_with_projection(parts / "clip_l", CLIP_WIDTHS[0], seed=2)
    clip_g = make_tiny_clip_with_projection(parts / "clip_g", CLIP_WIDTHS[1], seed=3)
    t5 = make_tiny_t5(parts / "t5")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                        caption_projection_dim=32, joint_attention_dim=T5_DIM,
                                        pooled_projection_dim=sum(CLIP_WIDTHS), pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=SIZE, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tokenizers = [CLIPTokenizer.from_pretrained(str(p), model_max_length=77) for p in (clip_l, clip_g)]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(str(clip_l)), tokenizer=tokenizers[0],
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(clip_g)), tokenizer_2=tokenizers[1],
        text_encoder_3=T5EncoderModel.from_pretrained(str(t5)), tokenizer_3=T5Tokenizer.from_pretrained(str(t5)))
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return root / "pipe"


def shared_sd3_pipeline(tmp_path_factory) -> Path:
    """The session's tiny SD3 folder, built by the first test module that asks (under pytest's base temp)."""
    return shared_pipeline(tmp_path_factory, "tiny_sd3", make_tiny_sd3_pipeline)


if __name__ == "__main__":   # build one and draw with it: python tests/tiny_pipelines_sd3.py DIR
    import sys

    pipe = draw_once(make_tiny_sd3_pipeline, sys.argv[1], SIZE)
    print(pipe.tokenizer_3("a 7").input_ids)
