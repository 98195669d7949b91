"""Seconds per step of gentrain's SDXL LoRA fine-tune against a re-implementation of the training step of
diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py (issue 30, "Bench").

The diffusers side is a re-implementation of that script's per-step work, not the script itself: the
examples are not in the installed diffusers package and the script imports torchvision (and `datasets`),
which this project does not install. Read from huggingface/diffusers main (58eb52c, 2026-08-23), it does
per step: its dataloader (num_workers 0 by default, so in the training process): PIL decode, convert RGB,
Resize + RandomCrop (original size and crop top-left kept), ToTensor + Normalize([0.5], [0.5]), both
tokenizers padded to model_max_length; then in the loop under accelerator.accumulate(unet): the fp32
VAE's latent_dist.sample() * scaling_factor, randn noise, randint timesteps, DDPMScheduler.add_noise,
compute_time_ids (original size + crop top-left + (resolution, resolution)), encode_prompt (each CLIP
with output_hidden_states: hidden_states[-2] concatenated, the pooled output of the second), the UNet
with added_cond_kwargs {time_ids, text_embeds}, MSE on the epsilon target, accelerator.backward,
clip_grad_norm_ on the LoRA parameters, AdamW, the LR scheduler, zero_grad. LoRA: peft LoraConfig(r=rank,
lora_alpha=rank, init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]) through
unet.add_adapter, text encoders frozen (--train_text_encoder off, its default), no gradient checkpointing
(its default). Here this is done with PIL + numpy in place of torchvision's transforms (same operations).

gentrain's side: `gentrain train finetune_sdxl_lora model.pretrained=<folder>` through the CLI (the preset's
rank 4 / alpha 4, its UNet targets, text encoders frozen), with gradient checkpointing off, no caption dropout,
constant LR, fp32 (train.mixed_precision=no) and data.num_workers=0, to match the script's defaults;
seconds per step = batch / images_per_s of metrics.jsonl's windows after the warm-up window.

The pipeline: a random-weight StableDiffusionXLPipeline built in code (class, parts and wiring as SDXL base:
two CLIPs, the second with projection, a "text_time" UNet, an f8 AutoencoderKL with SDXL's scaling factor,
EulerDiscreteScheduler on scaled-linear betas, 77-token tokenizers), at a size between the tests' tiny one
(16-px grey images, where Python overhead is most of a step) and the real one: RGB at --resolution (64 px by
default: 8x8 latents), CLIPs 64 and 128 wide, a UNet (32, 64, 128) with cross-attention in its two lower levels,
so that compute, not per-step bookkeeping, is most of a step on a CPU. Both sides load the same folder and read
the same shards (the `shapes` source: RGB scenes with captions), same batch, resolution and precision (fp32 on
CPU), interleaved round by round (gentrain, then the script's step) so load on a shared machine hits both;
the figure is the median over rounds.

Cached: the same `gentrain train` on the shards `gentrain data cache --pretrained <folder>` wrote once
(the VAE's posterior and every encoder output the SDXL adapter conditions on: both CLIPs' states, the pooled
vector, time_ids), so neither the VAE encoder nor the CLIPs run in the step; its build time is reported apart
(`cache_build_s`). Where the commit cannot cache a fine-tune's encoders, the JSON says it is not available.
Targets printed beside the ratios (issue 30): uncached step time <= 1.0x the script's; cached throughput
>= 1.4x the script's (MosaicML measured 1.4x for precomputed latents).

usage: python bench/finetune_speed.py [--rounds 3] [--steps 12] [--warmup 4] [--batch 2] [--resolution 64]
                                      [--tiny] [--out F]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
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


class ScriptStep:
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


def gentrain_args(pipe: Path, shards: Path, batch: int, resolution: int, steps: int, log_every: int,
                  out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "gentrain", "train", "finetune_sdxl_lora", f"model.pretrained={pipe}",
            f"data.shards={shards}", f"data.image_size={resolution}", "data.channels=3", "data.num_workers=0",
            "train.mixed_precision=no", "model.gradient_checkpointing=false", "model.cfg_dropout=0.0",
            "train.lr_schedule=constant", f"train.batch_size={batch}", f"train.max_steps={steps}",
            f"train.log_every={log_every}", "train.sample_every=0", "train.checkpoint_every=0",
            "train.progress_bar=false", "model.validation_prompts=[]", "model.export_kohya=false",
            "run.trackers=[]", "eval.num_samples=0", f"run.output_dir={out}", f"run.name={name}"]


def gentrain_round(pipe: Path, shards: Path, batch: int, resolution: int, warmup: int, steps: int,
                   out: Path, name: str) -> dict:
    """One `gentrain train` run of warmup + steps steps; seconds per step from metrics.jsonl's windows
    after the warm-up window (log_every = warmup)."""
    cmd = gentrain_args(pipe, shards, batch, resolution, warmup + steps, warmup, out, name)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"gentrain train failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [(r["step"], r["images_per_s"]) for r in rows if "images_per_s" in r and r["step"] > warmup]
    span = [b - a for a, b in zip([warmup] + [s for s, _ in rates], [s for s, _ in rates])]
    seconds = sum(n * batch / rate for n, (_, rate) in zip(span, rates))
    return {"step_s": seconds / sum(span), "steps": sum(span)}


def cached_available() -> bool:
    """Whether `gentrain data cache --pretrained` in this commit writes a fine-tune's encoder outputs."""
    import importlib.util
    return importlib.util.find_spec("gentrain.objectives.adapters.cached") is not None


def cache_shards(pipe: Path, shards: Path, out: Path, resolution: int) -> float:
    """`gentrain data cache --pretrained PIPE`: latents and every encoder output, once; its seconds."""
    cmd = [sys.executable, "-m", "gentrain", "data", "cache", "--shards", str(shards), "--out", str(out),
           "--pretrained", str(pipe), "--image-size", str(resolution), "--channels", "3"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"gentrain data cache failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure(a) -> dict:
    import torch

    from gentrain.data_pipeline.sources import build_source

    tmp = Path(tempfile.mkdtemp(prefix="gentrain-finetune-speed-"))
    size = "tiny" if a.tiny else "small"
    t0 = time.perf_counter()
    pipe = make_sdxl_pipeline(tmp / "sdxl", size)
    build_source("shapes", str(tmp / "shapes"), size=a.resolution, count=max(32, 4 * a.batch), max_samples=16)
    script = ScriptStep(pipe, tmp / "shapes", a.batch, a.resolution)
    setup_s = time.perf_counter() - t0
    cached = cached_available() and not a.no_cached
    cache_s = cache_shards(pipe, tmp / "shapes", tmp / "cached", a.resolution) if cached else None
    rounds = []
    for i in range(a.rounds):   # interleaved: load on a shared machine falls on both sides alike
        g = gentrain_round(pipe, tmp / "shapes", a.batch, a.resolution, a.warmup, a.steps, tmp / "runs", f"r{i}")
        s = script.round(a.warmup, a.steps)
        rounds.append({"gentrain_uncached_step_s": round(g["step_s"], 4), "script_step_s": round(s["step_s"], 4),
                       "script_data_s": round(s["data_s"], 4)})
        if cached:
            c = gentrain_round(pipe, tmp / "cached", a.batch, a.resolution, a.warmup, a.steps, tmp / "runs", f"c{i}")
            rounds[-1]["gentrain_cached_step_s"] = round(c["step_s"], 4)
        print(json.dumps({"round": i, **rounds[-1]}), file=sys.stderr, flush=True)   # partial figures as they come
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratio = med["gentrain_uncached_step_s"] / med["script_step_s"]
    na = "not available (no encoder cache for fine-tunes in this commit)" if not a.no_cached else "not measured (--no-cached)"
    cached_s = round(med["gentrain_cached_step_s"], 4) if cached else na
    speedup = round(med["script_step_s"] / med["gentrain_cached_step_s"], 3) if cached else na
    return {
        "baseline": f"a re-implementation of the training step of diffusers' {SCRIPT}, not the script itself",
        "gentrain": "gentrain train finetune_sdxl_lora (CLI), seconds per step from metrics.jsonl after warm-up; "
                    "cached: the same on the shards `gentrain data cache --pretrained` wrote (no encoder runs)",
        "pipeline": f"random-weight StableDiffusionXLPipeline, size '{size}': {SIZES[size]}",
        "lora": {"rank": RANK, "alpha": RANK, "targets": TARGETS, "trainable_params": script.lora_params,
                 "text_encoders": "frozen"},
        "batch": a.batch, "resolution": a.resolution, "precision": "fp32", "device": "cpu",
        "torch_threads": torch.get_num_threads(), "rounds": a.rounds, "warmup_steps": a.warmup,
        "timed_steps_per_round": a.steps, "setup_s": round(setup_s, 1),
        "per_round": rounds,
        "median_step_s": {"script": round(med["script_step_s"], 4),
                          "script_data_part": round(med["script_data_s"], 4),
                          "gentrain_uncached": round(med["gentrain_uncached_step_s"], 4),
                          "gentrain_cached": cached_s},
        "uncached_step_time_over_script": round(ratio, 3),
        "target_uncached": "<= 1.0x the script's step time",
        "met_uncached": ratio <= 1.0,
        "cached_throughput_over_script": speedup,
        "target_cached": ">= 1.4x the script's throughput (MosaicML: 1.4x with precomputed latents)",
        "met_cached": speedup >= 1.4 if cached else None,
        "cache_build_s": None if cache_s is None else round(cache_s, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per round and side")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps per round and side (gentrain's log_every)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="the smallest pipeline (smoke test): the code path, not a figure")
    ap.add_argument("--no-cached", action="store_true", help="skip the cached column even where it is available")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.steps % a.warmup:
        ap.error("--steps must be a multiple of --warmup (gentrain logs every --warmup steps)")
    sys.path[:0] = [ROOT]
    res = measure(a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True), Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
