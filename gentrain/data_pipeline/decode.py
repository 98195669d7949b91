"""Safe decoding of raw samples, and what makes a sample bad or filtered.

Only PIL images, UTF-8 text, JSON, ``.npy`` arrays (``allow_pickle=False``) and ``.cls`` integers
are decoded. Anything else (``.pyd``, ``.pickle``, ``.pth``, ...) is ignored: WebDataset's
default decoders would unpickle or ``torch.load`` it, which runs code from the data. A sample that
cannot be used raises :class:`BadSample` (its reason is a counter name: ``data.bad_sample_policy``
decides what follows), one that ``data.filters`` leaves out :class:`FilteredSample`. The image
transforms it applies are in :mod:`transforms`; batching the decoded samples in :mod:`batches`.
"""
from __future__ import annotations

import functools
import io
import json
import math
import operator
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from gentrain.errors import GentrainError
from gentrain.data_pipeline.transforms import (EXTRA_IMAGES, apply_box, bucket_shapes, crop_box, image_array, pick_bucket,
                                               to_channels)
from gentrain.data_pipeline.writer import IMAGE_EXTS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is a corrupt one, not a grey band


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class FilteredSample(BadSample):
    """A good sample that ``data.filters`` leaves out (counted apart from bad data)."""


_FILTER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*([^\s<>=!](?:.*\S)?)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def parse_filters(filters: Any) -> tuple[tuple[str, str, Any], ...]:
    """``data.filters`` -> ((field, op, value), ...); a number compares as a number, anything else
    as a string (quotes optional). Nothing is evaluated as code."""
    out = []
    for f in filters or ():
        m = _FILTER.match(str(f))
        if not m:
            raise GentrainError(f"data.filters entry {f!r}: write FIELD OP VALUE with OP one of >= <= > < == != "
                                "(e.g. original_width>=512)")
        name, op, value = m.groups()
        try:
            value = float(value)
        except ValueError:
            value = value.strip("'\"")
        out.append((name, op, value))
    return tuple(out)


def check_filters(meta: dict, filters: tuple[tuple[str, str, Any], ...]) -> None:
    """FilteredSample unless the json metadata passes every filter (a missing field fails)."""
    for name, op, value in filters:
        got = meta.get(name)
        if isinstance(value, float):
            ok = isinstance(got, (int, float)) and not isinstance(got, bool) and _OPS[op](got, value)
        else:
            ok = got is not None and _OPS[op](str(got), value)
        if not ok:
            raise FilteredSample("filtered", f"json {name}={got!r} fails data.filters {name}{op}{value}")


@dataclass(frozen=True)
class DecodeOptions:
    image_size: int = 32
    channels: int = 3
    random_crop: bool = False
    random_flip: bool = False
    aspect_buckets: bool = False
    aspect_max_ratio: float = 2.0
    max_image_pixels: int = 64_000_000
    require_caption: bool = True
    filters: tuple = ()          # parse_filters(data.filters)
    jpeg_draft: bool = True
    size_crop: bool = False      # DataConfig.size_crop


def open_image(data: bytes, max_pixels: int, draft: Optional[Any] = None) -> Image.Image:
    """A fully loaded PIL image; BadSample for corrupt or oversized (decompression bomb) data.
    The size is checked from the header, before any pixel is decoded. ``draft(w, h)`` may return
    the (width, height) the image will be resized to: a JPEG is then decoded DCT-scaled to the
    smallest size at or above it (``Image.draft``); ``im.info["source_size"]`` keeps the header size."""
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > max_pixels:
            raise BadSample("oversized_image", f"{im.width}x{im.height} pixels is over data.max_image_pixels={max_pixels}")
        size = im.size
        if draft is not None and im.format == "JPEG":
            im.draft(im.mode, draft(*size))
        im.load()
        im.info["source_size"] = size
    except Image.DecompressionBombError as e:  # PIL's own limit, if lower than ours
        raise BadSample("oversized_image", str(e)) from e
    except BadSample:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from e
    return im


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy header; object dtypes (pickles) are refused."""
    from numpy.lib import format as npf

    f = io.BytesIO(header)
    major, _ = npf.read_magic(f)
    shape, fortran, dtype = (npf.read_array_header_1_0 if major == 1 else npf.read_array_header_2_0)(f)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle, which is never used on data")
    return shape, fortran, dtype


def _load_npy(data: bytes) -> np.ndarray:
    """np.load(allow_pickle=False) semantics without re-parsing the header text of every sample:
    cached shards repeat the same few headers, and parsing them was half the decode time."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not an .npy array (bad magic)")
    start = (10 + int.from_bytes(data[8:10], "little")) if data[6] == 1 else (12 + int.from_bytes(data[8:12], "little"))
    shape, fortran, dtype = _npy_header(bytes(data[:start]))
    count = math.prod(shape)
    if len(data) - start < count * dtype.itemsize:
        raise ValueError(f"truncated .npy array: {len(data) - start} bytes for {count} x {dtype}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape, order="F" if fortran else "C")


def decode_sample(raw: dict[str, Any], opts: DecodeOptions, rng: Optional[random.Random] = None) -> dict[str, Any]:
    """A training sample ``{"key", "txt", "label", "image" | NAME (from NAME.npy), ...}`` from raw
    member bytes; arrays stay numpy ("image" (H, W, C) uint8) until :func:`batches.collate`. ``rng``
    drives random crop/flip. Extra images (:data:`EXTRA_IMAGES`: ``input.png`` -> "input",
    ``b.png`` -> "image_b", any image extension) are opened, converted and resized like the main
    image, with its very crop and flip (so paired images stay aligned), and must have its size;
    with "image_b" comes "label_b" (json ``label_b``, -1 when absent). Raises BadSample."""
    out: dict[str, Any] = {"key": raw["__key__"]}
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"json member: {e}") from e
        if not isinstance(meta, dict):
            meta = {}
    if opts.filters:
        check_filters(meta, opts.filters)
    tensors = 0
    for ext, data in raw.items():
        if ext.endswith(".npy") or ext == "npy":
            name = ext[: -len(".npy")] if ext != "npy" else "npy"
            try:
                arr = _load_npy(data)
            except (ValueError, OSError, EOFError) as e:  # object arrays refuse to load without pickle
                raise BadSample("bad_array", f"{ext} member: {e}") from e
            out[name] = arr
            tensors += 1
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is not None:
        plan: dict = {}

        def target(w0: int, h0: int) -> tuple[int, int]:
            """The bucket, crop box and scaled size of a w0 x h0 source, from its header."""
            if opts.aspect_buckets:
                plan["hw"] = pick_bucket(w0, h0, bucket_shapes(opts.image_size, opts.aspect_max_ratio))
            else:
                plan["hw"] = (opts.image_size, opts.image_size)
            plan["box"] = crop_box(w0, h0, *plan["hw"], rng if opts.random_crop else None)
            return plan["box"][:2]

        im = open_image(raw[image_ext], opts.max_image_pixels, target if opts.jpeg_draft else None)
        source_size = im.info["source_size"]
        if not plan:
            target(*source_size)
        im = to_channels(im, opts.channels)
        (h, w), box = plan["hw"], plan["box"]
        flip = bool(opts.random_flip and rng and rng.random() < 0.5)
        out["image"] = image_array(apply_box(im, box, h, w), flip)
        if opts.size_crop:
            out["size_crop"] = size_crop(meta, source_size, box, w, flip)
        for name, key in EXTRA_IMAGES.items():
            member = next((f"{name}.{e}" for e in IMAGE_EXTS if f"{name}.{e}" in raw), None)
            if member is None:
                continue
            try:
                extra = open_image(raw[member], opts.max_image_pixels, (lambda w0, h0: box[:2]) if opts.jpeg_draft else None)
                extra_size = extra.info["source_size"]
                extra = to_channels(extra, opts.channels)
            except BadSample as b:
                raise BadSample(b.reason, f"{member} member: {b.detail}") from None
            if extra_size != source_size:
                ew, eh = extra_size
                raise BadSample("mismatched_image", f"{member} member is {ew}x{eh}, the main image "
                                                    f"{source_size[0]}x{source_size[1]}: a sample's images must be the same size")
            out[key] = image_array(apply_box(extra, box, h, w), flip)  # the main image's crop and flip
    elif tensors == 0:
        raise BadSample("missing_image", f"no image ({', '.join(IMAGE_EXTS)}) or .npy member; has {sorted(raw)}")
    caption = None
    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadSample("bad_caption", f"txt member is not UTF-8: {e}") from e
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    if caption is None and opts.require_caption and (image_ext is not None or "latent" in out):
        raise BadSample("missing_caption", "no txt member (set data.require_caption=false for unconditional data)")
    out["txt"] = caption or ""
    label = meta.get("label")
    if label is None and "cls" in raw:
        label = raw["cls"].decode("utf-8", "replace").strip()
    out["label"] = _int_label(label, "label")
    if "image_b" in out:  # two-domain samples: the label of domain B's image
        out["label_b"] = _int_label(meta.get("label_b"), "json label_b")
    return out


def size_crop(meta: dict, source_size: tuple[int, int], box: tuple[int, int, int, int], out_w: int,
              flip: bool) -> np.ndarray:
    """(original height, original width, crop top, crop left), int64: the json's original_height /
    original_width when both are positive numbers, else the source's; the crop's corner in the
    resized image, mirrored when the sample was flipped (diffusers' SDXL script flips, then crops)."""
    ow, oh = meta.get("original_width"), meta.get("original_height")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (ow, oh)):
        ow, oh = source_size
    nw, _, left, top = box
    return np.array([int(oh), int(ow), top, nw - out_w - left if flip else left], dtype=np.int64)


def _int_label(value: Any, what: str) -> int:
    """A sample's integer label, -1 when absent; BadSample when it is not an integer."""
    try:
        return int(value) if value is not None and not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        raise BadSample("bad_label", f"{what} {value!r} is not an integer") from None
