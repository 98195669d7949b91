"""Latent and text-embedding caching (`gentrain data cache`): encode each image once through a
frozen autoencoder (the posterior mean and log-variance are stored, trainers sample z per step)
and each caption once through a frozen text encoder (embeddings + attention mask), writing new
shards that the reader serves as `latent` (2, c, h, w), `emb` (L, D) and `mask` (L,) keys.

Work is split by shard across processes (rank r takes input shards r, r+R, ...), each output
shard keeps its input shard's name and sample order and is written atomically; rank 0 writes
index.json last. Batches never cross shards, so a cache is the same whatever the process count.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from gentrain.errors import DataError, GentrainError
from gentrain.data_pipeline.batches import collate
from gentrain.data_pipeline.decode import BadSample, DecodeOptions, decode_sample
from gentrain.data_pipeline.shardlist import resolve_shards
from gentrain.data_pipeline.storage import open_url
from gentrain.data_pipeline.tario import iter_raw_samples


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _batches(url: str, opts: DecodeOptions, batch_size: int, allow_pipe: bool) -> Iterator[tuple[list[dict], dict]]:
    """Decoded samples of one shard in order, in batches (raw json kept for pass-through)."""
    f = open_url(url, allow_pipe=allow_pipe)
    try:
        pending: list[tuple[dict, dict]] = []
        for raw in iter_raw_samples(f, url):
            try:
                sample = decode_sample(raw, opts)
            except BadSample as e:
                raise DataError(f"shard {url}, sample {raw.get('__key__')!r}: {e}") from None
            pending.append((raw, sample))
            if len(pending) == batch_size:
                yield [r for r, _ in pending], collate([s for _, s in pending])
                pending = []
        if pending:
            yield [r for r, _ in pending], collate([s for _, s in pending])
    finally:
        f.close()


@torch.no_grad()
def cache_shards(shards: str, out_dir: str, *, autoencoder: str, text_encoder: str, max_length: int,
                 image_size: int, channels: int, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 allow_pipe: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Write this rank's share of cached shards into out_dir; returns their index entries."""
    import webdataset as wds
    from diffusers import AutoencoderKL

    from gentrain.modeling.text_encoders import FrozenTextEncoder

    shard_set = resolve_shards(shards, allow_pipe=allow_pipe)
    try:
        vae = AutoencoderKL.from_pretrained(autoencoder).to(device).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise GentrainError(f"--autoencoder {autoencoder!r}: not a diffusers AutoencoderKL folder ({str(e).splitlines()[0]})") from None
    if vae.config.in_channels != channels:
        raise GentrainError(f"--channels {channels} does not match the autoencoder's in_channels {vae.config.in_channels}")
    te = FrozenTextEncoder(text_encoder, max_length=max_length, key="--text-encoder").to(device)
    opts = DecodeOptions(image_size=image_size, channels=channels)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for i, (url, count) in enumerate(zip(shard_set.urls, shard_set.counts)):
        if i % world_size != rank:
            continue
        name = posixpath.basename(url.split("::")[-1])
        final = os.path.join(out_dir, name)
        tmp = final + f".tmp{os.getpid()}"
        n = 0
        with wds.TarWriter(tmp, encoder=False, mtime=0) as sink:
            for raws, batch in _batches(url, opts, batch_size, allow_pipe):
                post = vae.encode(batch["image"].to(device)).latent_dist
                latent = torch.stack([post.mean, post.logvar], 1).float().cpu().numpy()   # (B, 2, c, h, w)
                emb, mask = te(batch["txt"])
                emb, mask = emb.float().cpu().numpy(), mask.to(torch.uint8).cpu().numpy()
                for j, raw in enumerate(raws):
                    sample = {"__key__": raw["__key__"], "latent.npy": _npy(latent[j]), "emb.npy": _npy(emb[j]),
                              "mask.npy": _npy(mask[j]), "txt": batch["txt"][j].encode()}
                    if "json" in raw:
                        sample["json"] = raw["json"]
                    sink.write(sample)
                    n += 1
        if n != count:
            os.unlink(tmp)
            raise DataError(f"shard {url}: read {n} samples, index.json says {count}")
        os.replace(tmp, final)  # atomic: a half-written shard never has its final name
        written.append({"name": name, "samples": n, "bytes": os.path.getsize(final)})
    return written


def write_cache_index(out_dir: str, shards: str, counts: list[tuple[str, int]], meta: dict[str, Any]) -> dict:
    index = {"format": "gentrain-shards/1", "source": f"cache:{shards}", "samples": sum(c for _, c in counts),
             "shards": [{"name": n, "samples": c, "bytes": os.path.getsize(os.path.join(out_dir, n))} for n, c in counts],
             "cache": meta}
    tmp = os.path.join(out_dir, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "index.json"))
    return index


def check_cache_matches(shards: Optional[str], *, scaling_factor: Optional[float], text_encoder: Optional[str],
                        max_length: int, image_size: int, channels: int) -> None:
    """A run on cached shards must use what they were cached with: their latents are in one
    autoencoder's space (told by its measured scaling_factor) and their embeddings one text
    encoder's at one length. A mismatch is a clear error naming the config key, never silent."""
    index = os.path.join(shards or "", "index.json")
    if not shards or not os.path.isfile(index):
        return
    with open(index) as f:
        meta = json.load(f).get("cache")
    if not meta:
        return
    wrong = []
    if scaling_factor is None or abs(float(meta["scaling_factor"]) - scaling_factor) > 1e-6 * abs(scaling_factor):
        wrong.append(f"model.latent.autoencoder (cached with {meta['autoencoder']}, scaling_factor {meta['scaling_factor']})")
    if text_encoder is not None and (meta.get("text_encoder"), meta.get("max_length")) != (text_encoder, max_length):
        wrong.append(f"model.latent.text_encoder/max_length (cached with {meta.get('text_encoder')}, {meta.get('max_length')} tokens)")
    if (meta.get("image_size"), meta.get("channels")) != (image_size, channels):
        wrong.append(f"data.image_size/channels (cached at {meta.get('image_size')} px, {meta.get('channels')} channels)")
    if wrong:
        raise GentrainError(f"data.shards {shards} holds cached latents/embeddings that do not match this config: "
                            + "; ".join(wrong) + ". Re-run `gentrain data cache` or train on the image shards")
