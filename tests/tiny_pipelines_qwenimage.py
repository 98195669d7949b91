"""A tiny random-weight QwenImagePipeline, built offline in code and saved with save_pretrained once per test
session (shared_qwenimage_pipeline), scaled down as diffusers' own fast test scales it
(tests/pipelines/qwenimage/test_qwenimage.py: a 2-layer Qwen2.5-VL of width 16, a z_dim-4 AutoencoderKLQwenImage
with dim_mult [1, 2, 4] (4x down), a 2-block QwenImageTransformer2DModel taking 4 x 4 = 16 packed channels).

The VAE carries per-channel latents_mean / latents_std that are not 0 / 1 (so the normalisation is exercised),
the scheduler Qwen-Image's dynamic-shift config. The tokenizer is a byte-level BPE trained in code on a few
captions, with the chat template's special tokens (<|im_start|>, <|im_end|>, <|endoftext|>) as the pad token,
wrapped as a Qwen2TokenizerFast: the template splits into the real tokenizer's 34-token prefix (one token a word),
which encode_prompt drops, so the states start at the prompt as in the real pipeline.
"""
from __future__ import annotations

from pathlib import Path

from tiny_pipelines_common import draw_once, shared_pipeline

SIZE = 16                 # images: the VAE 4x down (two spatial downsamples), 4x4 latents, 2x2 packing: 4 tokens
Z_DIM = 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# the pipeline's template (QwenImagePipeline.prompt_template_encode) and digit captions: trained until every word
# is one token, its 34-token prefix splits as the real tokenizer splits it
TEMPLATE_TEXT = ["system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                 "relationships of the objects and background:\nuser\nassistant\n",
                 "a 0 1 2 3 4 5 6 7 8 9 zero one two three four five six seven eight nine digit"]
# Qwen-Image's scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json): dynamic shifting, exponential
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
                 shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def make_tiny_qwen_tokenizer(path: Path):
    """A byte-level BPE (vocabulary ~300) trained on the template and digit captions, as a Qwen2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEMPLATE_TEXT * 4, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>", model_max_length=2048)
    fast.save_pretrained(str(path))
    return Qwen2TokenizerFast.from_pretrained(str(path))


def make_tiny_qwenimage_pipeline(root: Path, channels: int = 1) -> Path:
    """root/pipe: a QwenImagePipeline folder on SIZE-px `channels`-channel images."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = make_tiny_qwen_tokenizer(root / "parts" / "tokenizer")
    n = len(tokenizer)
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=Z_DIM * 6, z_dim=Z_DIM, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], input_channels=channels,
                                 latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[0.5, 1.5, 0.8, 1.2])
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": n, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=n, vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        vision_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return root / "pipe"


def shared_qwenimage_pipeline(tmp_path_factory) -> Path:
    """The session's tiny Qwen-Image folder, built by the first test module that asks (under pytest's base temp)."""
    return shared_pipeline(tmp_path_factory, "tiny_qwenimage", make_tiny_qwenimage_pipeline)


if __name__ == "__main__":   # build one and draw with it: python tests/tiny_pipelines_qwenimage.py DIR
    import sys

    pipe = draw_once(make_tiny_qwenimage_pipeline, sys.argv[1], SIZE)
    emb, mask = pipe.encode_prompt(["a 3", "a seven seven"])
    print(tuple(emb.shape), mask)
    print(pipe.tokenizer.tokenize(pipe.prompt_template_encode.format("a 3"))[:40])
