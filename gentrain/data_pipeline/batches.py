"""Decoded samples into training batches: which samples may share a batch, collation, and the
joining of the reader's lane batches."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gentrain.data_pipeline.transforms import IMAGE_KEYS, batch_images_to_unit, images_to_tensor, images_to_uint8


def queue_key(sample: dict[str, Any]) -> tuple:
    """Samples batch together when all their arrays have the same shapes."""
    return tuple((k, v.shape) for k, v in sample.items() if isinstance(v, np.ndarray))


def collate(samples: list[dict[str, Any]], uint8_images: bool = False) -> dict[str, Any]:
    """Images ("image", "input", "image_b") to (B, C, H, W) float32 in [-1, 1] (uint8 with
    `uint8_images`: the reader's lanes, see :func:`join_lane_batches`), other arrays stacked
    (B, ...) as they are, strings listed, ints to LongTensor (B,)."""
    batch: dict[str, Any] = {}
    for k, v in samples[0].items():
        vals = [s[k] for s in samples]
        if k in IMAGE_KEYS:
            uint8 = uint8_images and all(a.dtype == np.uint8 for a in vals)
            batch[k] = images_to_uint8(vals) if uint8 else images_to_tensor(vals)
        elif isinstance(v, np.ndarray):
            batch[k] = torch.from_numpy(np.stack(vals))
        elif isinstance(v, int):
            batch[k] = torch.tensor(vals, dtype=torch.long)
        else:
            batch[k] = vals
    return batch


def join_lane_batches(parts: list[dict[str, Any]], uint8_images: bool = False) -> dict[str, Any]:
    """The lanes' batches as one training batch. Images stay uint8 with `uint8_images` (the
    Trainer makes them float on its device: :func:`batch_images_to_unit`), else they become
    float32 in [-1, 1] here, in one pass over the joined uint8 batch."""
    batch = concat_batches(parts)
    return batch if uint8_images else batch_images_to_unit(batch)


def concat_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Collated batches joined in order along the batch dimension (tensors concatenated, lists
    chained): the batch that collating all their samples at once gives."""
    if len(batches) == 1:
        return batches[0]
    # numpy's concatenate, one thread: torch.cat's intra-op threads spin on cores that the loader
    # workers need (measured: the consuming process took 0.36 of a core with torch.cat, 0.15 with this)
    return {k: torch.from_numpy(np.concatenate([b[k].numpy() for b in batches])) if isinstance(v, torch.Tensor)
            else [x for b in batches for x in b[k]] for k, v in batches[0].items()}
