"""Training images/s with and without latent caching: gentrain's Trainer vs a bare loop, same model.

Model: the t2i_flow_digits stack (AutoencoderKL f4 from the vae_digits preset, frozen MiniLM text
encoder, a small UNet2DConditionModel) on 16-px digits. gentrain: `gentrain train t2i_flow_digits`
on image shards, then on the shards `gentrain data cache` wrote (images/s from metrics.jsonl after
warm-up), with data.prefetch 0 and 2. Bare loops: the same nets, flow loss, clipping and EMA as the
preset, hand-written, reading (a) the same shard files with tarfile + PIL / np.load, (b) tensors held
in memory (no I/O: only the encoders' cost differs between its two modes). Prints JSON; the target
is gentrain's cached/uncached ratio >= the bare loop's, judged against (a), the loop that reads the
same data; (b) is reported beside it. Called by bench/data_throughput.py (or run alone).
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
UNET = "model.block_out_channels=[32,64]"   # the UNet these figures were first measured with (the preset now has [64, 128])


def _gentrain_rate(shards: Path, vae: Path, out: Path, name: str, steps: int, warmup: int, batch: int,
                   workers: int = 0, *extra: str) -> float:
    cmd = [sys.executable, "-m", "gentrain", "train", "t2i_flow_digits", f"data.shards={shards}",
           f"model.latent.autoencoder={vae}", f"train.max_steps={steps}", f"train.batch_size={batch}",
           "train.log_every=10", "train.sample_every=0", "train.checkpoint_every=0", "train.progress_bar=false",
           "eval.digits=false", UNET, f"run.output_dir={out}", f"run.name={name}", f"data.num_workers={workers}", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > warmup]
    return sum(rates) / len(rates)


def _memory_batches(data: dict, cached: bool, batch: int):
    """Random batches from tensors held in memory: no I/O at all."""
    n = data["latent"].shape[0]
    while True:
        idx = torch.randint(0, n, (batch,))
        if cached:
            yield {"latent": data["latent"][idx], "emb": data["emb"][idx]}
        else:
            yield {"image": data["image"][idx], "txt": [data["txt"][i] for i in idx.tolist()]}


def _tar_batches(shards: Path, cached: bool, batch: int):
    """Batches read from the same shard files as gentrain, the bare way: `tarfile` + PIL / np.load,
    shards in order, cycling (what a hand-written loop over webdataset tars does)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    files = sorted(shards.glob("*.tar"))
    buf: list[dict] = []
    while True:
        for f in files:
            with tarfile.open(f) as tar:
                cur: dict = {}
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    if cur and cur["key"] != key:
                        buf.append(cur)
                        cur = {}
                    cur["key"] = key
                    cur[ext] = tar.extractfile(m).read()
                    if len(buf) == batch:
                        yield _bare_collate(buf, cached, np, Image, io)
                        buf = []
                if cur:
                    buf.append(cur)


def _bare_collate(samples: list, cached: bool, np, Image, io) -> dict:
    if cached:
        return {"latent": torch.from_numpy(np.stack([np.load(io.BytesIO(s["latent.npy"])) for s in samples])),
                "emb": torch.from_numpy(np.stack([np.load(io.BytesIO(s["emb.npy"])) for s in samples]))}
    px = np.stack([np.asarray(Image.open(io.BytesIO(s["png"])).convert("L")) for s in samples])
    return {"image": torch.from_numpy(px).float().div(127.5).sub(1).unsqueeze(1), "txt": [s["txt"].decode() for s in samples]}


def _bare_rate(cfg, batches, cached: bool, steps: int, warmup: int, batch: int) -> float:
    import torch.nn.functional as F

    from gentrain.modeling.denoisers import ConditionalUNet
    from gentrain.objectives.conditioning import TextConditioning
    from gentrain.objectives.latent import LatentSpace

    m = cfg.model
    space = LatentSpace(m.latent.autoencoder, cfg.data.image_size, cfg.data.channels)
    text = TextConditioning(m.latent)
    torch.manual_seed(0)
    unet = ConditionalUNet(space.latent_channels, space.latent_size(), list(m.block_out_channels),
                           text.dim, m.layers_per_block, m.attention_head_dim, m.norm_num_groups)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True, foreach=True)
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        b = next(batches)
        with torch.no_grad():
            if cached:
                mean, logvar = b["latent"][:, 0], b["latent"][:, 1]
                emb = b["emb"]
            else:
                post = space.vae.encode(b["image"]).latent_dist
                mean, logvar = post.mean, post.logvar
                emb = text.encode_prompts(b["txt"])
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
    from gentrain.config import load_config
    from gentrain.modeling.autoencoders import KLAutoencoder

    tmp = Path(tempfile.mkdtemp(prefix="gentrain-cache-bench-"))
    build_source("digits", str(tmp / "images"), size=16, split="train")
    ae_cfg = load_config("vae_digits").model
    torch.manual_seed(0)
    KLAutoencoder(1, list(ae_cfg.block_out_channels), ae_cfg.latent_channels, ae_cfg.layers_per_block,
                  ae_cfg.norm_num_groups, 16).model.save_pretrained(str(tmp / "vae"))
    cfg = load_config("t2i_flow_digits", [f"model.latent.autoencoder={tmp / 'vae'}", f"data.shards={tmp / 'images'}", UNET])
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
    rate = {}
    for prefetch in (0, 2):  # 0: reading inside the step (the default on CPU); 2: a read-ahead thread (on GPU)
        for mode, shards in (("uncached", tmp / "images"), ("cached", tmp / "cached")):
            rate[f"gentrain_prefetch{prefetch}", mode] = _gentrain_rate(
                shards, tmp / "vae", runs, f"{mode}_p{prefetch}", steps, warmup, batch, workers, f"data.prefetch={prefetch}")
    for mode, shards in (("uncached", tmp / "images"), ("cached", tmp / "cached")):
        cached_ = mode == "cached"
        rate["bare_tar", mode] = _bare_rate(cfg, _tar_batches(shards, cached_, batch), cached_, steps, warmup, batch)
        rate["bare_memory", mode] = _bare_rate(cfg, _memory_batches(data, cached_, batch), cached_, steps, warmup, batch)
    loops = sorted({k for k, _ in rate})
    ratio = {k: round(rate[k, "cached"] / rate[k, "uncached"], 3) for k in loops}
    return {"model": f"t2i_flow_digits with {UNET} (AutoencoderKL f4 + MiniLM + UNet2DConditionModel), 16 px digits",
            "batch": batch, "steps_timed": steps - warmup, "gentrain_data_workers": workers, "cache_build_s": round(cache_s, 1),
            "images_per_s": {k: {m: round(rate[k, m], 1) for m in ("uncached", "cached")} for k in loops},
            "cached_over_uncached": ratio,
            "loops": {"gentrain_prefetch0": "gentrain train, data.prefetch=0 (reads inside the step; the CPU default)",
                      "gentrain_prefetch2": "gentrain train, data.prefetch=2 (a read-ahead thread; the GPU default)",
                      "bare_tar": "bare loop reading the same shards with tarfile + PIL / np.load",
                      "bare_memory": "bare loop on tensors held in memory (no I/O at all)"},
            "target": "gentrain ratio >= the bare loop's (bare_tar: the same shards read the bare way)",
            "met_vs_bare_tar": ratio["gentrain_prefetch0"] >= ratio["bare_tar"],
            "met_vs_bare_memory": ratio["gentrain_prefetch0"] >= ratio["bare_memory"]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="gentrain's data.num_workers (the preset's: 0)")
    a = ap.parse_args()
    print(json.dumps(measure(a.steps, a.warmup, a.batch, a.workers), indent=1))
