"""Small shard sets for the data tests."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from gentrain.data_pipeline.config import DataConfig
from gentrain.data_pipeline.reader import make_shard_stream

UNEVEN = (10, 13, 11, 12, 10, 13, 12)  # 7 shards, 81 samples: padding for 2 or 4 lanes


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sample(key: str, idx: int, size: int = 8) -> dict:
    """An RGB PNG whose red channel is idx % 256 and green idx // 256, caption and label."""
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = idx % 256, idx // 256, 7
    return {"__key__": key, "png": png(a), "txt": f"caption of {key}", "json": json.dumps({"label": idx % 10})}


def write_uneven(out_dir: str, sizes=UNEVEN, size: int = 8, prefix: str = "s") -> list[str]:
    """One tar per entry of ``sizes`` (plus index.json); returns all keys in writing order."""
    from gentrain.data_pipeline.writer import ShardSetWriter

    w = ShardSetWriter(out_dir, max_samples=max(sizes), source="test")
    keys, idx = [], 0
    for s, n in enumerate(sizes):
        for i in range(n):
            keys.append(f"{prefix}{s}_{i:02d}")
            w.write(sample(keys[-1], idx, size))
            idx += 1
        w.end_shard()
    w.close()
    return keys


def stream(shards: str, batch_size: int = 4, rank: int = 0, world_size: int = 1, seed: int = 0,
           uint8_images: bool = False, **cfg):
    c = DataConfig(source="shards", shards=shards, **cfg)
    return make_shard_stream(c, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                             uint8_images=uint8_images)


def take(st, n_batches: int) -> list[dict]:
    out, it = [], iter(st)
    for _ in range(n_batches):
        out.append(next(it))
    return out


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]
