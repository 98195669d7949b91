"""The held-out images a run is scored on, and PSNR."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator


def heldout_batches(cfg: Any, batch_size: int = 128) -> Iterator[dict]:
    """One pass over the held-out shards (eval.shards, else the training shards), no augmentation,
    at most eval.num_samples images, in a fixed order."""
    from gentrain.data_pipeline.build import build_stream

    data = dataclasses.replace(cfg.data, shards=cfg.eval.shards or cfg.data.shards, num_workers=0, mode="epoch",
                               random_crop=False, random_flip=False, aspect_buckets=False)
    stream = build_stream(data, batch_size=batch_size, rank=0, world_size=1, seed=cfg.eval.seed)
    left = min(cfg.eval.num_samples, stream.samples_per_epoch)
    for batch in stream:
        if left <= 0:
            return
        take = min(left, len(batch["key"]))
        yield {k: v[:take] for k, v in batch.items()}
        left -= take


def psnr(mse: float, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (range 2)."""
    return 10 * math.log10(data_range ** 2 / max(mse, 1e-12))
