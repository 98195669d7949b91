"""Image transforms of decoded samples: aspect buckets, channel conversion, resize + crop, flip,
and the [-1, 1] normalisation of image batches (uint8 (H, W, C) arrays until a batch is made)."""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import get_worker_info
from PIL import Image

# the extra image members of paired (Pix2Pix: input.png, the source; png is the target) and
# two-domain (CycleGAN: b.png, domain B; png is domain A) samples, NAME.EXT -> batch key; other
# NAME.EXT image members are ignored
EXTRA_IMAGES = {"input": "input", "b": "image_b"}
IMAGE_KEYS = ("image", *EXTRA_IMAGES.values())


def bucket_shapes(size: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (H, W) of about size*size pixels, ratios W/H from 1/max_ratio to
    max_ratio in 7 geometric steps, sides multiples of 8 (4 below 64 px)."""
    m = 8 if size >= 64 else 4
    shapes = []
    for k in range(-3, 4):
        r = max_ratio ** (k / 3)
        h = max(m, round(size / math.sqrt(r) / m) * m)
        w = max(m, round(size * math.sqrt(r) / m) * m)
        if (h, w) not in shapes:
            shapes.append((h, w))
    return shapes


def small_buckets(image_sizes: dict[str, int], size: int, max_ratio: float, global_batch: int) -> dict[tuple[int, int], int]:
    """{(H, W): samples} of the aspect buckets that an index's {"WxH": samples} fills with fewer
    than one global batch per epoch (their samples wait in the lanes' queues across epochs)."""
    buckets, counts = bucket_shapes(size, max_ratio), Counter()
    for wh, n in image_sizes.items():
        w, _, h = wh.partition("x")
        counts[pick_bucket(int(w), int(h), buckets)] += int(n)
    return {hw: n for hw, n in sorted(counts.items()) if n < global_batch}


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to the image's."""
    a = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - a))


def to_channels(im: Image.Image, channels: int) -> Image.Image:
    """RGB (channels=3) or L (channels=1) from any mode: alpha is composited over white, 16-bit
    and 32-bit grey are scaled (not clipped) to 8 bits, CMYK/P/YCbCr/... are converted."""
    target = "RGB" if channels == 3 else "L"
    if im.mode == target:
        return im
    if im.mode.startswith("I") or im.mode == "F":  # I;16*, I (16-bit PNGs), F: high-range grey
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "F":
            a = a / 257.0  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return im.convert(target) if im.mode != target else im


def crop_box(w: int, h: int, out_h: int, out_w: int, rng: Optional[random.Random]) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, left, top) of :func:`resize_crop` for a w x h image: the
    scale that covers (out_h, out_w), then a random crop with ``rng``, else a centred one."""
    scale = max(out_w / w, out_h / h)
    nw, nh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (nw, nh) == (out_w, out_h):
        return nw, nh, 0, 0
    left = rng.randint(0, nw - out_w) if rng else (nw - out_w) // 2
    top = rng.randint(0, nh - out_h) if rng else (nh - out_h) // 2
    return nw, nh, left, top


def apply_box(im: Image.Image, box: tuple[int, int, int, int], out_h: int, out_w: int) -> Image.Image:
    nw, nh, left, top = box
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BICUBIC)
    if (nw, nh) != (out_w, out_h):
        im = im.crop((left, top, left + out_w, top + out_h))
    return im


def resize_crop(im: Image.Image, out_h: int, out_w: int, rng: Optional[random.Random]) -> Image.Image:
    """Scale so the image covers (out_h, out_w), then crop: random with ``rng``, else centred."""
    return apply_box(im, crop_box(im.width, im.height, out_h, out_w, rng), out_h, out_w)


def image_array(im: Image.Image, flip: bool) -> np.ndarray:
    """(H, W, C) uint8; :func:`batches.collate` turns a batch of them into (B, C, H, W) in [-1, 1]."""
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return a[:, ::-1] if flip else a


def images_to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    """(B, C, H, W) float32 in [-1, 1] from (H, W, C) uint8 arrays: x / 127.5 - 1."""
    # numpy, single-threaded: torch's intra-op threads only contend with the loader's processes here
    x = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32, order="C")  # a contiguous copy
    x /= 127.5
    x -= 1.0
    return torch.from_numpy(x)


def images_to_uint8(arrays: list[np.ndarray]) -> torch.Tensor:
    """(B, C, H, W) uint8 from (H, W, C) uint8 arrays: what a loader worker ships (a quarter of
    the float32 bytes through shared memory); :func:`unit_images` makes the float batch. In a
    loader worker the batch is written straight into shared memory, as torch's default collate
    does, so handing it over copies nothing more."""
    h, w, c = arrays[0].shape
    out = torch.empty((len(arrays), c, h, w), dtype=torch.uint8)
    if get_worker_info() is not None:
        out = out.new(out.untyped_storage()._new_shared(out.numel())).view(out.shape)
    dst = out.numpy()
    for i, a in enumerate(arrays):
        dst[i] = a.transpose(2, 0, 1)
    return out


def unit_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) to float32 in [-1, 1], the values :func:`images_to_tensor` gives (the
    same two float32 operations, x / 127.5 - 1)."""
    x = x.to(torch.float32)
    x.div_(127.5)
    x.sub_(1.0)
    return x


def batch_images_to_unit(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch with its uint8 images (on any device) made float32 in [-1, 1] (:func:`unit_images`)."""
    return {k: unit_images(v) if k in IMAGE_KEYS and isinstance(v, torch.Tensor) and v.dtype == torch.uint8 else v
            for k, v in batch.items()}
