"""A tiny random-weight SanaPipeline, built offline in code and saved with save_pretrained once per test session
(shared_sana_pipeline), scaled down as diffusers' own fast tests scale Sana (tests/pipelines/sana/test_sana.py):
a 1-layer Gemma2Model 8 wide (the transformer's caption_channels), one transformer block with linear
self-attention and cross-attention, a three-level AutoencoderDC (f4: 32-px images, as SanaPipeline draws multiples
of 32, 8x8 latents, patch 1) with
Sana's DC-AE scaling factor 0.41407, and the scheduler the published pipeline folders ship: a
DPMSolverMultistepScheduler with flow sigmas and flow_shift 3.0 (Sana 1024px).

The tokenizer is a GemmaTokenizer (BPE, spaces as "\u2581", <bos> prepended) on a vocabulary trained in code with
`tokenizers` over a few digit captions, with Gemma's special tokens at Gemma's ids: <pad> 0, <eos> 1,
<bos> 2, <unk> 3, <mask> 4.
"""
from __future__ import annotations

import string
from pathlib import Path

from tiny_pipelines_common import draw_once, shared_pipeline

SIZE = 32             # images (SanaPipeline draws multiples of 32; f4 DC-AE: 8x8 latents, patch 1: 64 tokens)
GEMMA_DIM = 8         # Gemma2 hidden size = the transformer's caption_channels
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]   # Gemma's ids 0..4
CORPUS = ["a handwritten digit {w}", "the number {n}", "a {w}", "digit {n}, handwritten", "a photo of the digit {w}"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_tiny_gemma_tokenizer(path: Path):
    """A GemmaTokenizer whose BPE vocabulary and merges `tokenizers` trains here on digit captions."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")                      # as GemmaTokenizer's
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    alphabet = list(string.ascii_letters + string.digits + string.punctuation) + ["\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    texts = [c.format(n=n, w=w) for c in CORPUS for n, w in enumerate(WORDS)]
    tok.train_from_iterator(texts, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in
              __import__("json").loads(tok.to_str())["model"]["merges"]]
    tokenizer = GemmaTokenizer(vocab=tok.get_vocab(), merges=merges, add_bos_token=True, model_max_length=512)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def make_tiny_sana_pipeline(root: Path, channels: int = 1) -> Path:
    """root/pipe: a SanaPipeline folder on 32-px `channels`-channel images."""
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = make_tiny_gemma_tokenizer(root / "parts" / "tokenizer")
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=GEMMA_DIM,
                                         sample_size=SIZE // 4)
    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=channels, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=[1, 1, 1],
                        downsample_block_type="conv", upsample_block_type="interpolate",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    torch.manual_seed(0)
    gemma = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=GEMMA_DIM, initializer_range=0.02, intermediate_size=64,
                                     max_position_embeddings=8192, num_attention_heads=2, num_hidden_layers=1,
                                     num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                     bos_token_id=2, attn_implementation="eager"))
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return root / "pipe"


def shared_sana_pipeline(tmp_path_factory) -> Path:
    """The session's tiny Sana folder, built by the first test module that asks (under pytest's base temp)."""
    return shared_pipeline(tmp_path_factory, "tiny_sana", make_tiny_sana_pipeline)


if __name__ == "__main__":   # build one and draw with it: python tests/tiny_pipelines_sana.py DIR
    import sys

    pipe = draw_once(make_tiny_sana_pipeline, sys.argv[1], SIZE, use_resolution_binning=False,
                     complex_human_instruction=None)
    print(pipe.tokenizer("a seven").input_ids, type(pipe.tokenizer).__name__, type(pipe.scheduler).__name__)
