"""The one line a run prints when its shards hold images of another mode or size than the config
asks for (data.channels, data.image_size): the reader converts and resizes every image as it
decodes, which is right, but should not happen without a word (a 32-px RGB set read by a 16-px
grey preset trains on something else than the user may think).

The sizes come from the shard set's index.json (``image_sizes``, written by `gentrain data build`
and `gentrain data index --image-sizes`), else from the first image; the mode from the header of
the first sample's image (one read of the first shard's first members; nothing is decoded).
pipe: shards are not opened for this (that would run their command once more).
"""
from __future__ import annotations

import io
import sys
from typing import Optional

from gentrain.data_pipeline.config import DataConfig

MODE_NAMES = {"L": "grey", "1": "1-bit", "P": "palette", "LA": "grey+alpha", "I": "32-bit grey", "F": "float grey",
              "I;16": "16-bit grey", "I;16B": "16-bit grey", "I;16L": "16-bit grey", "PA": "palette+alpha"}
TARGET = {1: ("L", "grey (1 channel)"), 3: ("RGB", "RGB (3 channels)")}


def first_image(url: str, *, allow_pipe: bool, s3_endpoint_url: Optional[str]) -> Optional[tuple[str, str]]:
    """(mode, "WxH") of the first sample's main image (png/jpg/...), read from its header; None when
    the first sample has none (cached latents) or it cannot be read (the reader's bad-sample policy
    then deals with it)."""
    from PIL import Image

    from gentrain.data_pipeline.storage import open_url
    from gentrain.data_pipeline.tario import iter_members, sample_key
    from gentrain.data_pipeline.writer import IMAGE_EXTS

    if url.startswith("pipe:"):
        return None
    first = None
    try:
        with open_url(url, allow_pipe=allow_pipe, s3_endpoint_url=s3_endpoint_url) as f:
            for name, data in iter_members(f, want=lambda n: sample_key(n)[1] in IMAGE_EXTS):
                key = sample_key(name)[0]
                if first is None:
                    first = key
                if key != first:
                    return None
                if data is not None:
                    with Image.open(io.BytesIO(data)) as im:
                        return im.mode, f"{im.width}x{im.height}"
    except Exception:  # noqa: BLE001 - unreadable here is reported by the reader, per sample
        return None
    return None


def conversion_line(cfg: DataConfig, spec: str, image_sizes: Optional[dict], first: Optional[tuple[str, str]]) -> Optional[str]:
    """The line saying what the reader converts, or None when the shards already hold what the config asks."""
    target_mode, target_name = TARGET[cfg.channels]
    size = f"{cfg.image_size}x{cfg.image_size}"
    sizes = sorted(s for s in (image_sizes or {}) if s != "unreadable") or ([first[1]] if first else [])
    resize = not cfg.aspect_buckets and bool(sizes) and sizes != [size]
    mode = first[0] if first else None
    convert = mode is not None and mode != target_mode
    if not resize and not convert:
        return None
    name = MODE_NAMES.get(mode, mode) if mode else None
    if len(sizes) > 1:
        listed = ", ".join(sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        held = " ".join(filter(None, [name, f"images of {len(sizes)} sizes ({listed})"]))
    else:
        held = " ".join(filter(None, [sizes[0] if sizes else None, name, "images"]))
    to = " ".join(filter(None, [size if resize else None, target_name if convert else None]))
    keys = " and ".join(filter(None, [f"data.image_size={cfg.image_size}" if resize else None,
                                      f"data.channels={cfg.channels}" if convert else None]))
    return (f"gentrain: data.shards {spec} holds {held}; the reader converts them to {to}, as {keys} "
            f"ask{'s' if ' and ' not in keys else ''}")


def report_conversion(cfg: DataConfig, urls: tuple, image_sizes: Optional[dict]) -> Optional[str]:
    """Print (stderr) and return the conversion line of a shard set, if any."""
    if not urls:
        return None
    line = conversion_line(cfg, cfg.shards, image_sizes,
                           first_image(urls[0], allow_pipe=cfg.allow_pipe, s3_endpoint_url=cfg.s3_endpoint_url))
    if line and line not in _said:   # once a process (the held-out reads at the end build streams again)
        _said.add(line)
        print(line, file=sys.stderr)
    return line


_said: set[str] = set()
