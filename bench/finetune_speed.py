"""Seconds per step of gentrain's LoRA fine-tunes against re-implementations of the training steps of diffusers'
example scripts, side by side in one run: SDXL (`--pipeline sdxl`, issue 30, "Bench") against
examples/text_to_image/train_text_to_image_lora_sdxl.py, Flux (`--pipeline flux`, issue 31, "Bench") against
examples/dreambooth/train_dreambooth_lora_flux.py (what that re-implementation does per step, and the Flux
pipeline: bench/finetune_speed_flux.py's docstring). The JSON has the same layout for both.

SDXL: the diffusers side is a re-implementation of that script's per-step work, not the script itself: the
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
rank 4 / alpha 4, its UNet targets, text encoders frozen; Flux: finetune_flux_lora, its rank 4 / alpha 4 and
train_guidance 1, model.lora.targets set to the Flux script's default target_modules, as both sides must adapt the
same modules), with gradient checkpointing off, no caption dropout, constant LR, no gradient accumulation, fp32
(train.mixed_precision=no) and data.num_workers=0, to match the scripts' defaults; seconds per step = batch /
images_per_s of metrics.jsonl's windows after the warm-up window.

The pipeline: a random-weight StableDiffusionXLPipeline built in code (class, parts and wiring as SDXL base:
two CLIPs, the second with projection, a "text_time" UNet, an f8 AutoencoderKL with SDXL's scaling factor,
EulerDiscreteScheduler on scaled-linear betas, 77-token tokenizers), at a size between the tests' tiny one
(16-px grey images, where Python overhead is most of a step) and the real one: RGB at --resolution (64 px by
default: 8x8 latents), CLIPs 64 and 128 wide, a UNet (32, 64, 128) with cross-attention in its two lower levels,
so that compute, not per-step bookkeeping, is most of a step on a CPU. Both sides load the same folder and read
the same shards (the `shapes` source: RGB scenes with captions), same batch, resolution and precision (fp32 on
CPU), interleaved round by round (gentrain, then the script's step) so load on a shared machine hits both;
the figure is the median over rounds. Flux: a random-weight FluxPipeline in FLUX.1-dev's layout
(bench/finetune_speed_flux.py's SIZES: f8 VAE with 16 latent channels, CLIP 64 wide, T5 128 wide on 512 tokens,
2 double + 4 single blocks 128 wide), the same shards, batch, resolution and precision.

Cached: the same `gentrain train` on the shards `gentrain data cache --pretrained <folder>` wrote once
(the VAE's posterior and every encoder output the adapter conditions on: SDXL's CLIP states, pooled vector and
time_ids; Flux's T5 states and CLIP's pooled vector), so neither the VAE encoder nor a text encoder runs in the
step; its build time is reported apart (`cache_build_s`). Where the commit cannot cache a fine-tune's encoders,
the JSON says it is not available. Targets printed beside the ratios (issue 30; the same for Flux, issue 31):
uncached step time <= 1.0x the script's; cached throughput >= 1.4x the script's (MosaicML measured 1.4x for
precomputed latents).

usage: python bench/finetune_speed.py [--pipeline sdxl|flux] [--rounds 3] [--steps 12] [--warmup 4] [--batch 2]
                                      [--resolution 64] [--tiny] [--no-cached] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import finetune_speed_flux as flux
import finetune_speed_sdxl as sdxl

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# per pipeline: the preset, gentrain's overrides beyond the common ones, the builder, the script's step and targets
PIPELINES = {
    "sdxl": {"preset": "finetune_sdxl_lora", "overrides": [], "build": sdxl.make_sdxl_pipeline,
             "step": sdxl.ScriptStep, "script": sdxl.SCRIPT, "targets": sdxl.TARGETS, "sizes": sdxl.SIZES,
             "class": "StableDiffusionXLPipeline", "text_encoders": "frozen"},
    "flux": {"preset": "finetune_flux_lora",
             "overrides": [f"model.lora.targets=[{','.join(flux.SCRIPT_TARGETS)}]",
                           f"model.train_guidance={flux.GUIDANCE}"],
             "build": flux.make_flux_pipeline, "step": flux.FluxScriptStep, "script": flux.SCRIPT,
             "targets": flux.SCRIPT_TARGETS, "sizes": flux.SIZES, "class": "FluxPipeline",
             "text_encoders": "frozen (CLIP and T5)", "guidance": flux.GUIDANCE},
}


def gentrain_args(pipe: Path, shards: Path, batch: int, resolution: int, steps: int, log_every: int,
                  out: Path, name: str, spec: dict) -> list[str]:
    return [sys.executable, "-m", "gentrain", "train", spec["preset"], f"model.pretrained={pipe}",
            f"data.shards={shards}", f"data.image_size={resolution}", "data.channels=3", "data.num_workers=0",
            "train.mixed_precision=no", "model.gradient_checkpointing=false", "model.cfg_dropout=0.0",
            "train.lr_schedule=constant", f"train.batch_size={batch}", "train.grad_accum=1",
            f"train.max_steps={steps}", f"train.log_every={log_every}", "train.sample_every=0",
            "train.checkpoint_every=0", "train.progress_bar=false", "model.validation_prompts=[]",
            "model.export_kohya=false", "run.trackers=[]", "eval.num_samples=0", f"run.output_dir={out}",
            f"run.name={name}", *spec["overrides"]]


def gentrain_round(pipe: Path, shards: Path, batch: int, resolution: int, warmup: int, steps: int,
                   out: Path, name: str, spec: dict) -> dict:
    """One `gentrain train` run of warmup + steps steps; seconds per step from metrics.jsonl's windows
    after the warm-up window (log_every = warmup)."""
    cmd = gentrain_args(pipe, shards, batch, resolution, warmup + steps, warmup, out, name, spec)
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
    size, spec = "tiny" if a.tiny else "small", PIPELINES[a.pipeline]
    t0 = time.perf_counter()
    pipe = spec["build"](tmp / a.pipeline, size)
    build_source("shapes", str(tmp / "shapes"), size=a.resolution, count=max(32, 4 * a.batch), max_samples=16)
    script = spec["step"](pipe, tmp / "shapes", a.batch, a.resolution)
    setup_s = time.perf_counter() - t0
    cached = cached_available() and not a.no_cached
    cache_s = cache_shards(pipe, tmp / "shapes", tmp / "cached", a.resolution) if cached else None
    rounds = []
    for i in range(a.rounds):   # interleaved: load on a shared machine falls on both sides alike
        g = gentrain_round(pipe, tmp / "shapes", a.batch, a.resolution, a.warmup, a.steps, tmp / "runs", f"r{i}", spec)
        s = script.round(a.warmup, a.steps)
        rounds.append({"gentrain_uncached_step_s": round(g["step_s"], 4), "script_step_s": round(s["step_s"], 4),
                       "script_data_s": round(s["data_s"], 4)})
        if cached:
            c = gentrain_round(pipe, tmp / "cached", a.batch, a.resolution, a.warmup, a.steps, tmp / "runs", f"c{i}", spec)
            rounds[-1]["gentrain_cached_step_s"] = round(c["step_s"], 4)
        print(json.dumps({"round": i, **rounds[-1]}), file=sys.stderr, flush=True)   # partial figures as they come
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratio = med["gentrain_uncached_step_s"] / med["script_step_s"]
    na = "not available (no encoder cache for fine-tunes in this commit)" if not a.no_cached else "not measured (--no-cached)"
    cached_s = round(med["gentrain_cached_step_s"], 4) if cached else na
    speedup = round(med["script_step_s"] / med["gentrain_cached_step_s"], 3) if cached else na
    return {
        "baseline": f"a re-implementation of the training step of diffusers' {spec['script']}, not the script itself",
        "gentrain": f"gentrain train {spec['preset']} (CLI), seconds per step from metrics.jsonl after warm-up; "
                    "cached: the same on the shards `gentrain data cache --pretrained` wrote (no encoder runs)",
        "pipeline": f"random-weight {spec['class']}, size '{size}': {spec['sizes'][size]}",
        "lora": {"rank": sdxl.RANK, "alpha": sdxl.RANK, "targets": spec["targets"],
                 "trainable_params": script.lora_params, "text_encoders": spec["text_encoders"]},
        **({"train_guidance": spec["guidance"]} if "guidance" in spec else {}),
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
    ap.add_argument("--pipeline", choices=sorted(PIPELINES), default="sdxl",
                    help="sdxl: train_text_to_image_lora_sdxl.py's step; flux: train_dreambooth_lora_flux.py's")
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
