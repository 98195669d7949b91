"""A fine-tune's encoder outputs cached once (`gentrain data cache --pretrained PIPELINE`), so training never runs
the text encoders and the big ones (SD3's T5: the adapter's `cache_unloaded`) are never loaded.

Writing: each image goes through the pipeline's VAE (posterior mean and log-variance, stacked as `latent.npy`
(2, c, h, w), as the latent families' cache stores it: training samples z with the run's own RNG; an AutoencoderDC's
deterministic latent (c, h, w) as it is), each caption
through the adapter's own `encode` (the pipeline's encode_prompt: every cond kwarg it returns, per-token states,
pooled vectors, masks where any, one `NAME.npy` per sample), and each sample's extra conditioning through the
adapter's `extras` (SDXL's add_time_ids from the original size and the crop the reader made: `time_ids.npy`).
The "" encoding a dropped caption conditions on is computed once into `uncond.safetensors`. index.json's
"cache" entry names the pipeline (pretrained path or id, revision, class) and the keys, so a run on another
pipeline, or with text-encoder adapters (they need the captions encoded live), is refused in one line.
"""
from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor

from gentrain.errors import DataError, GentrainError

UNCOND_FILE = "uncond.safetensors"


def pipeline_id(pretrained: str) -> str:
    """A local folder's absolute path (so ./pipe and /abs/pipe are one pipeline), else the hub id as given."""
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.exists() else pretrained


def _frozen_call(adapter: Any):
    def call(name: str, *args: Any, **kw: Any) -> Any:
        return adapter.parts[name](*args, **kw)
    return call


@torch.no_grad()
def cache_pipeline_shards(shards: str, out_dir: str, *, pretrained: str, revision: Optional[str], image_size: int,
                          channels: int, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                          allow_pipe: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Write this rank's share of the cached shards (and on rank 0 the "" encoding); returns the index's
    "cache" entry (what write_cache_index records)."""
    import webdataset as wds
    from safetensors.torch import save_file

    from gentrain.data_pipeline.cache import _batches, _npy
    from gentrain.data_pipeline.decode import DecodeOptions
    from gentrain.data_pipeline.shardlist import resolve_shards
    from gentrain.objectives.adapters import load_adapter

    adapter = load_adapter(SimpleNamespace(pretrained=pretrained, revision=revision), key="--pretrained")
    try:   # the adapter's latent space: its fit check and its posterior (a Qwen-Image VAE's frame axis)
        space = adapter.latent_space(image_size, channels)
    except GentrainError as e:
        raise GentrainError(str(e).replace("config key 'model.pretrained'", "--pretrained")) from None
    space.to(device)
    for name in adapter.text_encoders:
        if adapter.parts.get(name) is not None:
            adapter.parts[name].to(device).eval().requires_grad_(False)
    call, shard_set = _frozen_call(adapter), resolve_shards(shards, allow_pipe=allow_pipe)
    opts = DecodeOptions(image_size=image_size, channels=channels, size_crop=adapter.size_conditioning)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    uncond = {k: v.float().cpu().contiguous() for k, v in adapter.encode([""], call).items()}
    cond_keys = list(uncond)
    if rank == 0:
        save_file(uncond, os.path.join(out_dir, UNCOND_FILE))
    extra_keys: list[str] = []
    for i, (url, count) in enumerate(zip(shard_set.urls, shard_set.counts)):
        if i % world_size != rank:
            continue
        final = os.path.join(out_dir, posixpath.basename(url.split("::")[-1]))
        tmp, n = final + f".tmp{os.getpid()}", 0
        with wds.TarWriter(tmp, encoder=False, mtime=0) as sink:
            for raws, batch in _batches(url, opts, batch_size, allow_pipe):
                mean, logvar = space.posterior(batch["image"].to(device))   # logvar None: a DC-AE's latent (Sana)
                arrays = {"latent": mean if logvar is None else torch.stack([mean, logvar], 1)}
                arrays.update(adapter.encode(list(batch["txt"]), call))
                extras = adapter.extras({**batch, "image": batch["image"].to(device)}, mean)
                extra_keys = list(extras)
                arrays.update(extras)
                arrays = {k: v.float().cpu().numpy() for k, v in arrays.items()}
                for j, raw in enumerate(raws):
                    sample = {"__key__": raw["__key__"], "txt": batch["txt"][j].encode()}
                    sample.update({f"{k}.npy": _npy(v[j]) for k, v in arrays.items()})
                    if "json" in raw:
                        sample["json"] = raw["json"]
                    sink.write(sample)
                    n += 1
        if n != count:
            os.unlink(tmp)
            raise DataError(f"shard {url}: read {n} samples, index.json says {count}")
        os.replace(tmp, final)
    if not extra_keys:   # this rank wrote no shard: the keys the adapter's extras give (SDXL: time_ids)
        extra_keys = list(adapter.extras({"image": torch.zeros(1, channels, image_size, image_size)}, torch.zeros(1)))
    return {"pipeline": {"pretrained": pipeline_id(pretrained), "revision": revision, "class": adapter.pipeline_class},
            "autoencoder": f"{pretrained} (vae)", "scaling_factor": float(space.scale),
            "text_encoder": f"{pretrained} (pipeline)", "max_length": None, "image_size": image_size,
            "channels": channels, "cond": cond_keys, "extras": extra_keys, "uncond": UNCOND_FILE}


def pipeline_cache(cfg: Any) -> Optional[dict[str, Any]]:
    """The "cache" entry the fine-tune's shards (data.shards, and eval.shards where set) were cached with, their
    folder added as "dir"; None for image shards. One-line refusals: a mix of cached and image shards, a cache
    made for the latent families or for another pipeline, other sizes, and text-encoder adapters."""
    from gentrain.data_pipeline.config import shard_specs

    m, d, found = cfg.model, cfg.data, []
    specs = [(s, "data.shards") for s in shard_specs(d)] + \
        [(s, "eval.shards") for s in [getattr(cfg.eval, "shards", None)] if s]
    for shards, key in specs:
        index = Path(shards) / "index.json"
        meta = json.loads(index.read_text()).get("cache") if index.is_file() else None
        found.append((shards, key, meta))
    if not any(meta for _, _, meta in found):
        return None
    want = {"pretrained": pipeline_id(m.pretrained), "revision": m.revision}
    for shards, key, meta in found:
        if not meta:
            raise GentrainError(f"config key '{key}': {shards} holds images while the other shards are cached "
                                "(`gentrain data cache --pretrained`): give all cached or all image shards")
        got = meta.get("pipeline")
        if not got:
            raise GentrainError(f"config key '{key}': {shards} holds latents/embeddings cached for the latent families "
                                f"(--autoencoder {meta.get('autoencoder')}); cache the fine-tune's with "
                                f"`gentrain data cache --pretrained {m.pretrained}` or give the image shards")
        if {k: got.get(k) for k in want} != want:
            raise GentrainError(f"config key '{key}': {shards} was cached with the {got.get('class')} "
                                f"{got.get('pretrained')!r} (revision {got.get('revision')}), not model.pretrained "
                                f"{want['pretrained']!r} (revision {m.revision}): re-run `gentrain data cache "
                                "--pretrained` or give the image shards")
        if (meta.get("image_size"), meta.get("channels")) != (d.image_size, d.channels):
            raise GentrainError(f"config key '{key}': {shards} was cached at {meta.get('image_size')} px, "
                                f"{meta.get('channels')} channels, not data.image_size={d.image_size}, "
                                f"data.channels={d.channels}")
    if m.text_encoder_lora.rank:
        raise GentrainError("config key 'model.text_encoder_lora.rank': text-encoder adapters train on captions "
                            f"encoded live, and {found[0][0]} holds cached embeddings: give the image shards or set "
                            "model.text_encoder_lora.rank=0")
    return {**found[0][2], "dir": str(found[0][0])}


def load_uncond(meta: dict[str, Any], zero: bool) -> dict[str, Tensor]:
    """What a dropped caption conditions on: the pipeline's "" encoding as cached (or zeros of its shape)."""
    from safetensors.torch import load_file

    uncond = load_file(os.path.join(meta["dir"], meta["uncond"]))
    return {k: torch.zeros_like(v) if zero else v for k, v in uncond.items()}


def cached_inputs(obj: Any, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """FinetuneMixin.inputs on cached shards: the same latents and random draws (z from the posterior, then the
    caption dropout), the cond kwargs read from the batch instead of encoded."""
    meta = obj.cached
    missing = [k for k in ("latent", *meta["cond"], *meta["extras"]) if k not in batch]
    if missing:
        raise GentrainError(f"cached shards {meta['dir']}: a batch lacks {', '.join(missing)} (keys "
                            f"{', '.join(sorted(batch))}): re-run `gentrain data cache --pretrained`")
    x0 = obj.space.latents(batch, obj.rng)
    n = x0.shape[0]
    cond = {k: batch[k].to(x0.device).float() for k in meta["cond"]}
    if obj.cfg_dropout > 0:
        drop = obj.rng.rand(n, device=x0.device) < obj.cfg_dropout
        if obj._uncond is None:
            obj._uncond = load_uncond(meta, obj.adapter.zero_uncond())
        un = {k: v.to(x0.device) for k, v in obj._uncond.items()}
        cond = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), un[k].to(v.dtype).expand_as(v), v)
                for k, v in cond.items()}
    return x0, {**cond, **{k: batch[k].to(x0.device).float() for k in meta["extras"]}}
