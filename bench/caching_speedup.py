"""Training images/s with and without latent caching: gentrain's Trainer vs a bare loop, same model.

Model: the t2i_flow_digits stack (AutoencoderKL f4 from the vae_digits preset, frozen MiniLM text
encoder, a small UNet2DConditionModel) on 16-px digits. gentrain: `gentrain train t2i_flow_digits`
on image shards, then on the shards `gentrain data cache` wrote (images/s from metrics.jsonl after
warm-up). Bare loop: the same nets, flow loss, clipping and EMA as the preset, hand-written, data
held in memory (so only the encoders' cost differs between its two modes). Prints JSON; the target is gentrain's
cached/uncached ratio >= the bare loop's. Called by bench/data_throughput.py (or run alone).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gentrain_rate(shards: Path, vae: Path, out: Path, name: str, steps: int, warmup: int, batch: int,
                   workers: int = 0) -> float:
    cmd = [sys.executable, "-m", "gentrain", "train", "t2i_flow_digits", f"data.shards={shards}",
           f"model.latent.autoencoder={vae}", f"train.max_steps={steps}", f"train.batch_size={batch}",
           "train.log_every=10", "train.sample_every=0", "train.checkpoint_every=0", "train.progress_bar=false",
           "eval.digits=false", f"run.output_dir={out}", f"run.name={name}", f"data.num_workers={workers}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > warmup]
    return sum(rates) / len(rates)


def _bare_rate(cfg, data: dict, cached: bool, steps: int, warmup: int, batch: int) -> float:
    import torch.nn.functional as F

    from gentrain.modeling.denoisers import ConditionalUNet
    from gentrain.train.objectives.latent import LatentSpace, TextConditioning

    m = cfg.model
    space = LatentSpace(m.latent.autoencoder, cfg.data.image_size, cfg.data.channels)
    text = TextConditioning(m.latent)
    torch.manual_seed(0)
    unet = ConditionalUNet(space.latent_channels, space.latent_size(), list(m.block_out_channels),
                           text.dim, m.layers_per_block, m.attention_head_dim, m.norm_num_groups)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True, foreach=True)
    n = data["latent"].shape[0]
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (batch,))
        with torch.no_grad():
            if cached:
                mean, logvar = data["latent"][idx, 0], data["latent"][idx, 1]
                emb = data["emb"][idx]
            else:
                post = space.vae.encode(data["image"][idx]).latent_dist
                mean, logvar = post.mean, post.logvar
                emb = text.encode_prompts([data["txt"][i] for i in idx.tolist()])
            x0 = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * space.scale
        noise, t = torch.randn_like(x0), torch.sigmoid(torch.randn(batch))
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        loss = F.mse_loss(unet(xt, t * 1000, emb=emb), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.max_grad_norm)
        opt.step()
        ema.step(unet.parameters())
    return batch * (steps - warmup) / (time.perf_counter() - t0)


def measure(steps: int = 80, warmup: int = 20, batch: int = 64, workers: int = 0) -> dict:

    from gentrain.data_pipeline.cache import cache_shards, write_cache_index
    from gentrain.data_pipeline.config import DataConfig
    from gentrain.data_pipeline.reader import make_shard_stream
    from gentrain.data_pipeline.sources import build_source
    from gentrain.launch.config import load_config
    from gentrain.modeling.autoencoders import KLAutoencoder

    tmp = Path(tempfile.mkdtemp(prefix="gentrain-cache-bench-"))
    build_source("digits", str(tmp / "images"), size=16, split="train")
    ae_cfg = load_config("vae_digits").model
    torch.manual_seed(0)
    KLAutoencoder(1, list(ae_cfg.block_out_channels), ae_cfg.latent_channels, ae_cfg.layers_per_block,
                  ae_cfg.norm_num_groups, 16).model.save_pretrained(str(tmp / "vae"))
    cfg = load_config("t2i_flow_digits", [f"model.latent.autoencoder={tmp / 'vae'}", f"data.shards={tmp / 'images'}"])
    t0 = time.perf_counter()
    written = cache_shards(str(tmp / "images"), str(tmp / "cached"), autoencoder=str(tmp / "vae"),
                           text_encoder=cfg.model.latent.text_encoder, max_length=cfg.model.latent.max_length,
                           image_size=16, channels=1)
    write_cache_index(str(tmp / "cached"), str(tmp / "images"), [(w["name"], w["samples"]) for w in written], {})
    cache_s = time.perf_counter() - t0

    def load_all(shards):
        s = make_shard_stream(DataConfig(source="shards", shards=str(shards), image_size=16, channels=1),
                              batch_size=1500, rank=0, world_size=1, seed=0)
        return next(iter(s))
    images, cached = load_all(tmp / "images"), load_all(tmp / "cached")
    data = {"image": images["image"], "txt": list(images["txt"]), "latent": cached["latent"], "emb": cached["emb"]}
    runs = tmp / "runs"
    g_unc = _gentrain_rate(tmp / "images", tmp / "vae", runs, "uncached", steps, warmup, batch, workers)
    g_cac = _gentrain_rate(tmp / "cached", tmp / "vae", runs, "cached", steps, warmup, batch, workers)
    b_unc = _bare_rate(cfg, data, False, steps, warmup, batch)
    b_cac = _bare_rate(cfg, data, True, steps, warmup, batch)
    return {"model": "t2i_flow_digits (AutoencoderKL f4 + MiniLM + UNet2DConditionModel), 16 px digits",
            "batch": batch, "steps_timed": steps - warmup, "gentrain_data_workers": workers, "cache_build_s": round(cache_s, 1),
            "gentrain_images_per_s": {"uncached": round(g_unc, 1), "cached": round(g_cac, 1)},
            "bare_images_per_s": {"uncached": round(b_unc, 1), "cached": round(b_cac, 1)},
            "gentrain_cached_over_uncached": round(g_cac / g_unc, 3),
            "bare_cached_over_uncached": round(b_cac / b_unc, 3),
            "target": "gentrain ratio >= bare ratio"}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="gentrain's data.num_workers (the preset's: 0)")
    a = ap.parse_args()
    print(json.dumps(measure(a.steps, a.warmup, a.batch, a.workers), indent=1))
