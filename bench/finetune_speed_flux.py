"""bench/finetune_speed.py's Flux row: a random-weight FluxPipeline built in code and the training step of diffusers'
examples/dreambooth/train_dreambooth_lora_flux.py (huggingface/diffusers main 58eb52c, 2026-08-23), re-implemented.

Not the script itself: the examples are not in the installed diffusers package and the script imports torchvision,
which this project does not install. What it does, read from that commit, with the bench's arguments
(--dataset_name with --caption_column: a caption per image, as gentrain's shards have; --resolution; AdamW; fp32;
every other argument its default): DreamBoothDataset transforms every image once when it is built (exif_transpose,
RGB, Resize(resolution) bilinear, RandomCrop, ToTensor, Normalize([0.5], [0.5])), so a step's data work is the
DataLoader's shuffle and collate_fn (stack); per step, under accelerator.accumulate: compute_text_embeddings(prompts)
under no_grad (CLIP's pooler_output on 77 tokens, T5's states on --max_sequence_length 512 tokens, text_ids zeros),
the VAE's latent_dist.sample(), (z - shift_factor) * scaling_factor, FluxPipeline._prepare_latent_image_ids,
randn noise, compute_density_for_timestep_sampling (--weighting_scheme none: uniform u), timesteps from the
scheduler copy's grid and get_sigmas (FLUX.1's scheduler shifts dynamically, so the training grid is unshifted),
(1 - sigma) x0 + sigma noise, FluxPipeline._pack_latents, the guidance tensor where transformer.config.guidance_embeds,
the transformer at timestep / 1000, FluxPipeline._unpack_latents, compute_loss_weighting_for_sd3, the flow target
noise - x0, the weighted MSE, accelerator.backward, clip_grad_norm_ over transformer.parameters(), AdamW
(weight decay 1e-4), the LR scheduler, zero_grad, loss.item() for the log. LoRA: LoraConfig(r=--rank 4,
lora_alpha=--lora_alpha 4, dropout 0, init_lora_weights="gaussian", target_modules = the script's default without
--lora_layers: SCRIPT_TARGETS) through transformer.add_adapter; CLIP and T5 frozen (--train_text_encoder off);
gradient checkpointing off. --guidance_scale: README_flux.md's 1 (gentrain's preset's model.train_guidance).
"""
from __future__ import annotations

import io
import string
from pathlib import Path

from finetune_speed_sdxl import RANK, StepRounds, make_tokenizer, read_shards

SCRIPT = "examples/dreambooth/train_dreambooth_lora_flux.py (huggingface/diffusers main, 58eb52c)"
# the script's target_modules when --lora_layers is not given (train_dreambooth_lora_flux.py, main 58eb52c)
SCRIPT_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"]
GUIDANCE = 1.0              # README_flux.md's --guidance_scale=1; finetune_flux_lora's model.train_guidance
MAX_SEQUENCE_LENGTH = 512   # --max_sequence_length default
FLUX1_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096)
# VAE widths (f = 2**(levels-1)), latent channels (FLUX.1: 16), CLIP width / layers, T5 d_model / layers,
# transformer double / single blocks, heads x head dim, rope axes (summing to the head dim)
SIZES = {
    "small": {"vae": (16, 32, 64, 64), "latent": 16, "clip": 64, "clip_layers": 4, "t5": 128, "t5_layers": 2,
              "blocks": (2, 4), "heads": 4, "head_dim": 32, "rope": (8, 12, 12)},
    "tiny": {"vae": (8, 16), "latent": 4, "clip": 16, "clip_layers": 2, "t5": 64, "t5_layers": 1,    # the tests'
             "blocks": (1, 1), "heads": 2, "head_dim": 16, "rope": (4, 4, 8)},
}


def make_t5_tokenizer(path: Path) -> Path:
    """A T5 tokenizer built offline (unigram over characters, as tests/tiny_pipelines_sd3.py builds it)."""
    from transformers import T5Tokenizer

    pieces = ["\u2581" + c for c in string.ascii_lowercase + string.digits] + \
        list(string.ascii_letters + string.digits + string.punctuation) + ["\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH).save_pretrained(str(path))
    return path


def make_flux_pipeline(path: Path, size: str) -> Path:
    """A random-weight FluxPipeline folder at SIZES[size], FLUX.1-dev's layout as tests/tiny_pipelines_flux.py
    builds it (guidance_embeds, the VAE's shift and scaling factors, the dynamic-shift scheduler)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    z = SIZES[size]
    tokenizer = CLIPTokenizer.from_pretrained(str(make_tokenizer(path / "tokenizer")))
    tokenizer_2 = T5Tokenizer.from_pretrained(str(make_t5_tokenizer(path / "tokenizer_2")))
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    w = z["clip"]
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=w, intermediate_size=4 * w, num_hidden_layers=z["clip_layers"],
        num_attention_heads=max(2, w // 32), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    d = z["t5"]
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=d, d_ff=2 * d, d_kv=32, num_heads=d // 32,
                                 num_layers=z["t5_layers"], relative_attention_num_buckets=8, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * z["latent"], num_layers=z["blocks"][0],
                                         num_single_layers=z["blocks"][1], attention_head_dim=z["head_dim"],
                                         num_attention_heads=z["heads"], joint_attention_dim=d,
                                         pooled_projection_dim=w, guidance_embeds=True, axes_dims_rope=z["rope"])
    n = len(z["vae"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=z["vae"], layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=z["latent"], norm_num_groups=8, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)   # FLUX.1's VAE
    FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER), vae=vae,
                 text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                 tokenizer_2=tokenizer_2).save_pretrained(str(path / "pipe"), safe_serialization=True)
    return path / "pipe"


class FluxScriptStep(StepRounds):
    """The training step of train_dreambooth_lora_flux.py, re-implemented (see the module docstring), on the
    pipeline folder and the shards' (png, caption) pairs held in memory."""

    def __init__(self, pipe: Path, shards: Path, batch: int, resolution: int, seed: int = 42):
        import copy

        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState, PartialState
        from accelerate.utils import set_seed
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        for st in (AcceleratorState, GradientState, PartialState):
            st._reset_state(*([True] if st is AcceleratorState else []))
        self.acc = Accelerator(mixed_precision="no", gradient_accumulation_steps=1)
        set_seed(seed)
        p = str(pipe)
        self.tokenizers = [CLIPTokenizer.from_pretrained(p, subfolder="tokenizer"),
                           T5TokenizerFast.from_pretrained(p, subfolder="tokenizer_2")]
        self.sched = copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_pretrained(p, subfolder="scheduler"))
        self.text_encoders = [CLIPTextModel.from_pretrained(p, subfolder="text_encoder"),
                              T5EncoderModel.from_pretrained(p, subfolder="text_encoder_2")]
        self.vae = AutoencoderKL.from_pretrained(p, subfolder="vae")
        transformer = FluxTransformer2DModel.from_pretrained(p, subfolder="transformer")
        for m in [transformer, self.vae, *self.text_encoders]:   # weight_dtype: fp32 without mixed precision
            m.requires_grad_(False)
            m.to(self.acc.device, dtype=torch.float32)
        transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, init_lora_weights="gaussian",
                                           target_modules=SCRIPT_TARGETS))
        params = [q for q in transformer.parameters() if q.requires_grad]
        self.lora_params = sum(q.numel() for q in params)
        opt = torch.optim.AdamW([{"params": params, "lr": 1e-4}], betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        self.batch, self.res = batch, resolution
        self.pixel_values, self.prompts = self._dataset(read_shards(shards))
        lr = get_scheduler("constant", optimizer=opt, num_warmup_steps=0, num_training_steps=10 ** 6)
        self.transformer, self.opt, self.lr = self.acc.prepare(transformer, opt, lr)
        self.order, self.pos = torch.randperm(len(self.prompts)).tolist(), 0

    def _dataset(self, samples: list) -> tuple[list, list]:
        """DreamBoothDataset.__init__: every image transformed once (random_flip and center_crop off)."""
        import random

        import numpy as np
        import torch
        from PIL import Image
        from PIL.ImageOps import exif_transpose

        pixel_values, r = [], self.res
        for png, _ in samples:
            image = exif_transpose(Image.open(io.BytesIO(png)))
            image = image.convert("RGB") if image.mode != "RGB" else image
            if min(image.size) != r:   # Resize(size): the shorter side to size
                s = r / min(image.size)
                image = image.resize((max(r, int(image.width * s)), max(r, int(image.height * s))), Image.BILINEAR)
            y1, x1 = random.randint(0, image.height - r), random.randint(0, image.width - r)   # RandomCrop
            px = torch.from_numpy(np.asarray(image.crop((x1, y1, x1 + r, y1 + r)), dtype=np.float32) / 255.0)
            pixel_values.append((px.permute(2, 0, 1) - 0.5) / 0.5)
        return pixel_values, [caption for _, caption in samples]

    def next_batch(self) -> dict:
        """The DataLoader (shuffle, num_workers 0) with collate_fn (no prior preservation)."""
        import torch

        idx = []
        for _ in range(self.batch):
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.prompts)).tolist(), 0
            idx.append(self.order[self.pos])
            self.pos += 1
        pixel_values = torch.stack([self.pixel_values[i] for i in idx])
        return {"pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
                "prompts": [self.prompts[i] for i in idx]}

    def compute_text_embeddings(self, prompts: list[str]):
        """The script's compute_text_embeddings -> encode_prompt (_encode_prompt_with_clip, _encode_prompt_with_t5)."""
        import torch

        (clip, t5), (tok_clip, tok_t5), dev = self.text_encoders, self.tokenizers, self.acc.device
        with torch.no_grad():
            ids = tok_clip(prompts, padding="max_length", max_length=77, truncation=True,
                           return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
            pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output.to(dtype=clip.dtype)
            pooled = pooled.repeat(1, 1, 1).view(len(prompts), -1)
            ids = tok_t5(prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                         return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
            embeds = t5(ids.to(t5.device))[0].to(dtype=t5.dtype, device=t5.device)
            embeds = embeds.repeat(1, 1, 1).view(len(prompts), embeds.shape[1], -1)
            text_ids = torch.zeros(embeds.shape[1], 3).to(dtype=clip.dtype)
        return embeds.to(dev), pooled.to(dev), text_ids.to(dev)

    def get_sigmas(self, timesteps, n_dim: int = 4, dtype=None):
        sigmas = self.sched.sigmas.to(device=self.acc.device, dtype=dtype)
        schedule_timesteps = self.sched.timesteps.to(self.acc.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(self.acc.device)]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def step(self, batch: dict) -> float:
        import torch
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        acc, transformer, vae, dev = self.acc, self.transformer, self.vae, self.acc.device
        with acc.accumulate([transformer]):
            prompt_embeds, pooled_prompt_embeds, text_ids = self.compute_text_embeddings(batch["prompts"])
            model_input = vae.encode(batch["pixel_values"].to(dtype=vae.dtype)).latent_dist.sample()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            model_input = model_input.to(dtype=torch.float32)
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            b, c, h, w = model_input.shape
            latent_image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, torch.float32)
            noise = torch.randn_like(model_input)
            u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b, logit_mean=0.0,
                                                      logit_std=1.0, mode_scale=1.29)
            indices = (u * self.sched.config.num_train_timesteps).long()
            timesteps = self.sched.timesteps[indices].to(device=model_input.device)
            sigmas = self.get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy_model_input, batch_size=b, num_channels_latents=c,
                                                height=h, width=w)
            if acc.unwrap_model(transformer).config.guidance_embeds:
                guidance = torch.tensor([GUIDANCE], device=dev).expand(b)
            else:
                guidance = None
            model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                     pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds,
                                     txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]
            model_pred = FluxPipeline._unpack_latents(model_pred, height=h * vae_scale_factor,
                                                      width=w * vae_scale_factor, vae_scale_factor=vae_scale_factor)
            weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(b, -1), 1)
            loss = loss.mean()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(transformer.parameters(), 1.0)
            self.opt.step()
            self.lr.step()
            self.opt.zero_grad()
        return loss.detach().item()   # logs = {"loss": loss.detach().item(), ...}

    def round(self, warmup: int, steps: int) -> dict:
        self.transformer.train()   # once per epoch in the script
        return super().round(warmup, steps)
