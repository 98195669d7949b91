"""bench/finetune_speed.py's SDXL row: the random-weight StableDiffusionXLPipeline it builds and the training step
of diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py, re-implemented (what it does per step and
why it is re-implemented, not run: bench/finetune_speed.py's docstring). Also what the rows share: the offline
CLIP tokenizer, the shards read into memory, the timed rounds.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

SCRIPT = "examples/text_to_image/train_text_to_image_lora_sdxl.py (huggingface/diffusers main, 58eb52c)"
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
RANK = 4
# widths: VAE levels (f = 2**(levels-1)), CLIP-1 / CLIP-2 width and layers, UNet levels, UNet attention heads
SIZES = {
    "small": {"vae": (16, 32, 64, 64), "clip": (64, 128), "clip_layers": 4, "unet": (32, 64, 128),
              "heads": (2, 4, 8), "time_dim": 32},
    "tiny": {"vae": (8, 16), "clip": (16, 32), "clip_layers": 2, "unet": (16, 32), "heads": (2, 4), "time_dim": 8},
}


def make_tokenizer(path: Path, max_length: int = 77) -> Path:
    """A CLIPTokenizer built offline: the byte-level alphabet as the vocabulary (no merges)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length).save_pretrained(str(path))
    return path


def make_sdxl_pipeline(path: Path, size: str) -> Path:
    """A random-weight StableDiffusionXLPipeline folder at SIZES[size] (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    z = SIZES[size]
    tokenizer = CLIPTokenizer.from_pretrained(str(make_tokenizer(path / "tokenizer")))
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)

    def clip_config(width: int, **kw) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=z["clip_layers"], num_attention_heads=max(2, width // 32),
                              max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                              eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **kw)
    w1, w2 = z["clip"]
    te1 = CLIPTextModel(clip_config(w1))
    te2 = CLIPTextModelWithProjection(clip_config(w2, projection_dim=w2))
    n = len(z["vae"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=z["vae"], latent_channels=4,
                        norm_num_groups=8, scaling_factor=0.13025)    # SDXL base's VAE scaling factor
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(z["unet"]) - 1)   # SDXL: no attention at the top level
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=z["unet"], layers_per_block=2,
                                down_block_types=down, up_block_types=tuple(reversed(
                                    [d.replace("Down", "Up") for d in down])),
                                cross_attention_dim=w1 + w2, attention_head_dim=z["heads"], norm_num_groups=8,
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=z["time_dim"],
                                projection_class_embeddings_input_dim=6 * z["time_dim"] + w2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler).save_pretrained(str(path / "pipe"))
    return path / "pipe"


class StepRounds:
    """Timed rounds of a re-implemented script step: subclasses give next_batch() and step(batch)."""

    def round(self, warmup: int, steps: int) -> dict:
        """warmup + steps steps; seconds per step over the timed ones (data included, and apart)."""
        total, data = 0.0, 0.0
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = self.next_batch()
            t1 = time.perf_counter()
            self.step(batch)
            if i >= warmup:
                total += time.perf_counter() - t0
                data += t1 - t0
        return {"step_s": total / steps, "data_s": data / steps}


class ScriptStep(StepRounds):
    """The training step of train_text_to_image_lora_sdxl.py, re-implemented (see the module docstring),
    on the pipeline folder and the shards' (png, caption) pairs held in memory."""

    def __init__(self, pipe: Path, shards: Path, batch: int, resolution: int, seed: int = 42):
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState, PartialState
        from accelerate.utils import set_seed
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        for st in (AcceleratorState, GradientState, PartialState):
            st._reset_state(*([True] if st is AcceleratorState else []))
        self.acc = Accelerator(mixed_precision="no", gradient_accumulation_steps=1)
        set_seed(seed)
        p = str(pipe)
        self.tok1 = AutoTokenizer.from_pretrained(p, subfolder="tokenizer", use_fast=False)
        self.tok2 = AutoTokenizer.from_pretrained(p, subfolder="tokenizer_2", use_fast=False)
        self.sched = DDPMScheduler.from_pretrained(p, subfolder="scheduler")
        self.te1 = CLIPTextModel.from_pretrained(p, subfolder="text_encoder")
        self.te2 = CLIPTextModelWithProjection.from_pretrained(p, subfolder="text_encoder_2")
        self.vae = AutoencoderKL.from_pretrained(p, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet")
        for m in (self.vae, self.te1, self.te2, unet):
            m.requires_grad_(False)
        dev = self.acc.device
        for m in (unet, self.vae, self.te1, self.te2):   # weight_dtype: fp32 without mixed precision; the VAE fp32
            m.to(dev, dtype=torch.float32)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
        self.params = [q for q in unet.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lr = get_scheduler("constant", optimizer=self.opt, num_warmup_steps=0, num_training_steps=10 ** 6)
        self.unet, self.opt, self.lr = self.acc.prepare(unet, self.opt, lr)
        self.samples = read_shards(shards)
        self.batch, self.res = batch, resolution
        self.lora_params = sum(q.numel() for q in self.params)
        self.order, self.pos = torch.randperm(len(self.samples)).tolist(), 0

    def _tokenize(self, tokenizer, captions):   # tokenize_prompt
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def _example(self, png: bytes, caption: str) -> dict:
        """preprocess_train for one image: convert RGB, Resize(resolution) (shorter side), RandomCrop,
        ToTensor + Normalize([0.5], [0.5]); original size and crop top-left kept."""
        import random

        import numpy as np
        import torch
        from PIL import Image

        image = Image.open(io.BytesIO(png)).convert("RGB")
        original = (image.height, image.width)
        r = self.res
        if min(image.size) != r:
            s = r / min(image.size)
            image = image.resize((max(r, round(image.width * s)), max(r, round(image.height * s))), Image.BILINEAR)
        y1, x1 = random.randint(0, image.height - r), random.randint(0, image.width - r)
        image = image.crop((x1, y1, x1 + r, y1 + r))
        px = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return {"pixel_values": (px - 0.5) / 0.5, "original_sizes": original, "crop_top_lefts": (y1, x1),
                "caption": caption}

    def next_batch(self) -> dict:
        """The DataLoader (shuffle, num_workers 0) with preprocess_train and collate_fn."""
        import torch

        examples = []
        for _ in range(self.batch):
            if self.pos == len(self.order):
                self.order, self.pos = torch.randperm(len(self.samples)).tolist(), 0
            examples.append(self._example(*self.samples[self.order[self.pos]]))
            self.pos += 1
        captions = [e["caption"] for e in examples]
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
                "input_ids_one": self._tokenize(self.tok1, captions),
                "input_ids_two": self._tokenize(self.tok2, captions),
                "original_sizes": [e["original_sizes"] for e in examples],
                "crop_top_lefts": [e["crop_top_lefts"] for e in examples]}

    def encode_prompt(self, ids_list):
        """The script's encode_prompt with text_input_ids_list: hidden_states[-2] of each, the pooled of the last."""
        import torch

        embeds = []
        for te, ids in zip((self.te1, self.te2), ids_list):
            out = te(ids.to(te.device), output_hidden_states=True, return_dict=False)
            pooled, states = out[0], out[-1][-2]   # the pooled output of the last encoder; penultimate states
            embeds.append(states.view(states.shape[0], states.shape[1], -1))
        return torch.concat(embeds, dim=-1), pooled.view(states.shape[0], -1)

    def step(self, batch: dict) -> float:
        import torch
        import torch.nn.functional as F

        acc, unet, vae, sched = self.acc, self.unet, self.vae, self.sched
        unet.train()
        with acc.accumulate(unet):
            model_input = vae.encode(batch["pixel_values"].to(acc.device)).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=model_input.device).long()
            noisy = sched.add_noise(model_input, noise, timesteps)

            def compute_time_ids(original_size, crops_coords_top_left):
                target_size = (self.res, self.res)
                ids = torch.tensor([list(original_size + crops_coords_top_left + target_size)])
                return ids.to(acc.device, dtype=torch.float32)
            add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in
                                      zip(batch["original_sizes"], batch["crop_top_lefts"])])
            prompt_embeds, pooled = self.encode_prompt([batch["input_ids_one"], batch["input_ids_two"]])
            pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs={"time_ids": add_time_ids,
                                                                            "text_embeds": pooled},
                        return_dict=False)[0]
            assert sched.config.prediction_type == "epsilon"
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            avg = acc.gather(loss.repeat(self.batch)).mean()
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.lr.step()
            self.opt.zero_grad()
        return avg.item()     # train_loss += avg_loss.item() / gradient_accumulation_steps


def read_shards(shards: Path) -> list[tuple[bytes, str]]:
    """(png bytes, caption) of every sample in the shard set, in order."""
    out = []
    for f in sorted(shards.glob("*.tar")):
        cur: dict = {}
        with tarfile.open(f) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                cur.setdefault(key, {})[ext] = tar.extractfile(m).read()
        out += [(v["png"], v["txt"].decode()) for v in cur.values() if "png" in v]
    return out

