"""What a training run reads from outside its config, checked before the run directory is made
and before anything heavy loads: local shard folders and files exist, a pretrained part named by a
path exists (never tried as a hub id), and a local frozen autoencoder fits the data (channels,
downsampling). Each failure is one line naming the config key. Hub ids and s3:// / pipe: shards
are left to the loaders, which check the same things when they load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gentrain.data_pipeline.config import dataset_names
from gentrain.data_pipeline.shardlist import check_local_shards

# config keys that name a pretrained part (a local folder or a hub id), where a family has them
PRETRAINED_KEYS = ("model.pretrained", "model.latent.autoencoder", "model.latent.text_encoder", "model.text_encoder")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


def shard_keys(cfg: Any) -> list[tuple[str, str]]:
    """(config key, shard spec) of every shard set the run reads, held-out ones included."""
    d = cfg.data
    out = []
    if d.source == "shards":
        out += [(f"data.datasets[{name}].shards", ds.shards) for name, ds in zip(dataset_names(d), d.datasets)] \
            if d.datasets else [("data.shards", d.shards)]   # by name, as the mixing reader names them
    if cfg.eval.shards and d.source == "shards":
        out.append(("eval.shards", cfg.eval.shards))
    return [(k, s) for k, s in out if s]


def check_inputs(cfg: Any) -> None:
    """One GentrainError naming the config key for the first input that cannot work (module docstring)."""
    from gentrain.modeling.pretrained import check_pretrained
    from gentrain.modeling.text_encoders import resolve_text_encoder_path
    from gentrain.objectives.latent import check_autoencoder_fit

    for key, spec in shard_keys(cfg):
        check_local_shards(spec, f"config key {key!r}")
    for key in PRETRAINED_KEYS:
        value = _get(cfg, key)
        if isinstance(value, str) and value:
            check_pretrained(resolve_text_encoder_path(value) if key.endswith("text_encoder") else value, key)
    d = cfg.data
    autoencoder, pipeline = _get(cfg, "model.latent.autoencoder"), _get(cfg, "model.pretrained")
    if autoencoder and (ae := _json(Path(autoencoder) / "config.json")):
        check_autoencoder_fit(ae, channels=d.channels, image_size=d.image_size)
    if pipeline and (vae := _json(Path(pipeline) / "vae" / "config.json")) and \
            (unet := _json(Path(pipeline) / "unet" / "config.json")):
        check_autoencoder_fit(vae, channels=d.channels, image_size=d.image_size,
                              net_in_channels=int(unet.get("in_channels", 4)), key="model.pretrained")


def _json(path: Path) -> dict:
    """A local model's config.json, or {} where there is none to read (a hub id: its loader checks)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}   # not ours to judge here: the loader names a malformed config when it reads it
