"""Sample sources for shard writing: built-in (digits, shapes, toy2d; edges2digits and
digits_inverted for image-to-image GANs) and user data (image folder with captions, jsonl
manifest). Each yields encoded samples ``{"__key__", "png", "txt", "json"}`` (paired sources add
``input.png`` or ``b.png``) that :func:`~gentrain.data_pipeline.writer.write_shards` stores as they are."""
from __future__ import annotations

import csv
import io
import json
import os
import random
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from gentrain.errors import DataError, GentrainError
from gentrain.data_pipeline.writer import IMAGE_EXTS, write_shards

Sample = dict[str, Any]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = (
    "a handwritten digit {n}",
    "the number {w}, written by hand",
    "a handwritten {w} ({n})",
    "the digit {n}, {w}, scribbled in ink",
    "a scanned handwritten number {w}",
    "a low-resolution scan of the numeral {n}",
    "the number {n} written by hand",
    "a hand-drawn {w}",
    "digit {w}: a handwritten {n}",
    "a blurry handwritten figure {n}, read as {w}",
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


DIGITS_TEST_START = 1500  # digits[1500:] (297 images, later writers) are the held-out split


def digits_indices(split: str = "all") -> range:
    """Indices of sklearn's digits in a split: all (1,797), train ([:1500]) or test ([1500:])."""
    return {"all": range(0, 1797), "train": range(0, DIGITS_TEST_START), "test": range(DIGITS_TEST_START, 1797)}[split]


def _digit_images(size: int, seed: int, count: Optional[int],
                  split: str) -> Iterator[tuple[int, int, Image.Image, str]]:
    """(index, label, upscaled grey image, caption) of the digits of a split, in index order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    indices = digits_indices(split)
    n = len(indices) if count is None else min(count, len(indices))
    rng = random.Random(f"digits:{seed}:{split}")
    for i in indices[:n]:
        label = int(d.target[i])
        pixels = np.clip(d.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (8, 8), values 0..16
        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC)
        yield i, label, img, rng.choice(DIGIT_CAPTIONS).format(n=label, w=DIGIT_WORDS[label])


def _digit_meta(i: int, label: int) -> dict[str, Any]:
    return {"label": label, "digit": DIGIT_WORDS[label], "index": i, "source": "sklearn.datasets.load_digits",
            "original_size": [8, 8]}


def digits_samples(*, size: int = 32, seed: int = 0, count: Optional[int] = None,
                   split: str = "all") -> Iterator[Sample]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled (bicubic) to ``size`` px, grey
    ink-on-black PNGs, with a varied caption naming the digit and the label in json."""
    for i, label, img, caption in _digit_images(size, seed, count, split):
        yield {"__key__": f"digits_{i:05d}", "png": _png(img), "txt": caption, "json": _json(_digit_meta(i, label))}


EDGE_THRESHOLD = 128  # ink is grey level >= this


def edge_map(img: Image.Image, threshold: int = EDGE_THRESHOLD) -> Image.Image:
    """The inner boundary of a grey image's ink, 1 px thin, white (255) on black: pixels >=
    ``threshold`` with at least one of their 8 neighbours below it (outside the image counts as
    background). Deterministic and mirror-symmetric: edge_map(flip(x)) == flip(edge_map(x))."""
    ink = np.asarray(img.convert("L")) >= threshold
    pad = np.pad(ink, 1, constant_values=False)
    h, w = ink.shape
    interior = np.logical_and.reduce([pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return Image.fromarray(((ink & ~interior) * 255).astype(np.uint8), mode="L")


def edges2digits_samples(*, size: int = 32, seed: int = 0, count: Optional[int] = None,
                         split: str = "all") -> Iterator[Sample]:
    """Paired digits for Pix2Pix: the digit (as :func:`digits_samples`) is the target ``png``, its
    :func:`edge_map` the source ``input.png``, same size, both grey; caption and label as digits."""
    for i, label, img, caption in _digit_images(size, seed, count, split):
        meta = {**_digit_meta(i, label), "input": f"edge_map (inner ink boundary, ink >= {EDGE_THRESHOLD})"}
        yield {"__key__": f"edges2digits_{i:05d}", "png": _png(img), "input.png": _png(edge_map(img)),
               "txt": caption, "json": _json(meta)}


def thick_inverted(img: Image.Image) -> Image.Image:
    """Domain B of ``digits_inverted``: strokes thickened (3x3 max filter) and inverted (255 - x),
    so dark thick ink on white."""
    return ImageOps.invert(img.convert("L").filter(ImageFilter.MaxFilter(3)))


def digits_inverted_samples(*, size: int = 32, seed: int = 0, count: Optional[int] = None,
                            split: str = "all") -> Iterator[Sample]:
    """Two unpaired domains for CycleGAN: domain A ``png`` is a plain digit (as digits), domain B
    ``b.png`` a different digit image in :func:`thick_inverted` style. B pairs each A with the next
    image of a seeded cycle through the images written (the split, or its first ``count``): never
    the same image, each used once as B. Labels ``label`` (A) and ``label_b`` (B) in json; the
    caption is A's."""
    digits = list(_digit_images(size, seed, count, split))
    if len(digits) < 2:
        raise GentrainError(f"digits_inverted needs at least 2 images to pair unlike digits, got --count {count}")
    order = list(range(len(digits)))
    random.Random(f"digits_inverted:{seed}:{split}").shuffle(order)
    partner = {a: b for a, b in zip(order, order[1:] + order[:1])}
    for k, (i, label, img, caption) in enumerate(digits):
        j, label_b, img_b, _ = digits[partner[k]]
        meta = {**_digit_meta(i, label), "label_b": label_b, "digit_b": DIGIT_WORDS[label_b], "index_b": j,
                "b": "thick_inverted (3x3 max filter, 255 - x)"}
        yield {"__key__": f"digits_inverted_{i:05d}", "png": _png(img), "b.png": _png(thick_inverted(img_b)),
               "txt": caption, "json": _json(meta)}


SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
                "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "cyan": (40, 200, 210)}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, color) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)


def _relation(a: dict, b: dict) -> str:
    """Where shape a is relative to shape b, by the larger offset of their centres."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _phrase(s: dict) -> str:
    return f"a {s['size']} {s['color']} {s['shape']}"


def make_shape_scene(index: int, *, size: int = 64, seed: int = 0) -> tuple[Image.Image, str, dict]:
    """One scene of 1-2 coloured shapes on a dark background: (image, caption, ground truth).
    A pure function of (seed, index)."""
    rng = random.Random(f"shapes:{seed}:{index}")
    img = Image.new("RGB", (size, size), (16, 16, 20))
    draw = ImageDraw.Draw(img)
    n = rng.choice((1, 2, 2))
    colors = rng.sample(sorted(SHAPE_COLORS), n)
    shapes = []
    # two shapes sit in opposite halves (vertical or horizontal split) so they never overlap
    vertical = rng.random() < 0.5
    for k in range(n):
        big = rng.random() < 0.5
        r = size * (rng.uniform(0.17, 0.22) if big else rng.uniform(0.08, 0.12))
        lo, hi = r + 1, size - r - 1
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if n == 2:
            # first shape wholly in the first half, second wholly in the second
            half_lo, half_hi = (r + 1, size / 2 - r) if k == 0 else (size / 2 + r, size - r - 1)
            pos = rng.uniform(min(half_lo, half_hi), max(half_lo, half_hi))
            if vertical:
                cy = pos
            else:
                cx = pos
        kind = rng.choice(SHAPE_KINDS)
        _draw_shape(draw, kind, cx, cy, r, SHAPE_COLORS[colors[k]])
        shapes.append({"shape": kind, "color": colors[k], "size": "large" if big else "small",
                       "center": [round(cx, 2), round(cy, 2)], "radius": round(r, 2),
                       "bbox": [round(cx - r, 2), round(cy - r, 2), round(cx + r, 2), round(cy + r, 2)]})
    if n == 1:
        caption, relation = _phrase(shapes[0]), None
    else:
        if rng.random() < 0.5:
            shapes.reverse()  # either shape may be named first
        relation = _relation(shapes[0], shapes[1])
        caption = f"{_phrase(shapes[0])} {relation} {_phrase(shapes[1])}"
    return img, caption, {"shapes": shapes, "relation": relation, "index": index, "seed": seed}


def shapes_samples(*, size: int = 64, seed: int = 0, count: int = 10000) -> Iterator[Sample]:
    """Procedural scenes of coloured shapes with compositional captions ("a small red circle
    above a large blue square") and the ground truth in json; any count, deterministic."""
    for i in range(count):
        img, caption, truth = make_shape_scene(i, size=size, seed=seed)
        yield {"__key__": f"shapes_{i:07d}", "png": _png(img), "txt": caption, "json": _json(truth)}


def toy2d_samples(*, dist: str = "checkerboard", seed: int = 0, count: int = 10000) -> Iterator[Sample]:
    """Points of a 2-D toy distribution, one per sample as ``x.npy`` (float32, shape (2,))."""
    import torch

    from gentrain.data_pipeline.toy2d import sample_toy2d

    pts = sample_toy2d(dist, count, torch.Generator().manual_seed(seed)).numpy().astype(np.float32)
    for i in range(count):
        buf = io.BytesIO()
        np.save(buf, pts[i], allow_pickle=False)
        yield {"__key__": f"{dist}_{i:07d}", "x.npy": buf.getvalue(), "json": _json({"dist": dist, "index": i})}


def _read_image_file(path: str) -> tuple[str, bytes]:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    with open(path, "rb") as f:
        return ext, f.read()


def _caption_table(root: str) -> dict[str, str]:
    """file (relative to root) -> caption, from root/captions.jsonl or root/captions.csv."""
    table: dict[str, str] = {}
    jl, cs = os.path.join(root, "captions.jsonl"), os.path.join(root, "captions.csv")
    if os.path.exists(jl):
        with open(jl) as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if "file" not in row or not ({"caption", "text"} & row.keys()):
                        raise DataError(f"{jl}:{ln}: a line needs 'file' and 'caption' (or 'text')")
                    table[os.path.normpath(row["file"])] = row.get("caption", row.get("text"))
    if os.path.exists(cs):
        with open(cs, newline="") as f:
            for ln, row in enumerate(csv.DictReader(f), 2):
                if "file" not in row or "caption" not in row:
                    raise DataError(f"{cs}: needs a header 'file,caption' (line {ln} has {sorted(row)})")
                table[os.path.normpath(row["file"])] = row["caption"]
    return table


def folder_samples(root: str, *, missing_caption: str = "error") -> Iterator[Sample]:
    """Images under ``root`` (recursively, sorted) with captions from a sidecar ``NAME.txt`` or
    ``root/captions.jsonl`` / ``captions.csv``; image bytes are stored as they are (no re-encode).
    ``missing_caption``: error | skip | empty."""
    if not os.path.isdir(root):
        raise GentrainError(f"folder source {root!r} is not a directory")
    table = _caption_table(root)
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                   if os.path.splitext(f)[1].lower().lstrip(".") in IMAGE_EXTS)
    if not files:
        raise GentrainError(f"folder source {root!r} has no images ({', '.join(IMAGE_EXTS)})")
    for i, rel in enumerate(files):
        path = os.path.join(root, rel)
        side = os.path.splitext(path)[0] + ".txt"
        if os.path.exists(side):
            with open(side, encoding="utf-8") as f:
                caption = f.read().strip()
        else:
            caption = table.get(os.path.normpath(rel))
        if caption is None:
            if missing_caption == "skip":
                continue
            if missing_caption == "error":
                raise DataError(f"{path}: no caption (no {os.path.basename(side)}, not in captions.jsonl/csv); "
                                f"use --missing-caption skip|empty")
            caption = ""
        ext, data = _read_image_file(path)
        yield {"__key__": f"img_{i:07d}", "__origin__": path, ext: data, "txt": caption, "json": _json({"file": rel})}


def jsonl_samples(manifest: str) -> Iterator[Sample]:
    """A manifest of lines ``{"image": path, "caption": str, ...}`` (paths relative to the
    manifest's folder); other fields (e.g. ``label``) go to the sample's json."""
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            image = row.pop("image", None) or row.pop("file", None)
            if image is None:
                raise DataError(f"{manifest}:{ln}: a line needs 'image' (a path)")
            caption = row.pop("caption", row.pop("text", None))
            if caption is None:
                raise DataError(f"{manifest}:{ln}: no 'caption' for {image}")
            path = os.path.join(base, image)
            if not os.path.isfile(path):
                raise DataError(f"{manifest}:{ln}: image {path} does not exist")
            ext, data = _read_image_file(path)
            yield {"__key__": f"item_{ln:07d}", "__origin__": path, ext: data, "txt": caption,
                   "json": _json({"file": image, **row})}


BUILTIN = ("digits", "shapes", "toy2d", "edges2digits", "digits_inverted")
DIGIT_SOURCES = {"digits": digits_samples, "edges2digits": edges2digits_samples,
                 "digits_inverted": digits_inverted_samples}


def parse_source(spec: str) -> tuple[str, Optional[str]]:
    kind, _, arg = spec.partition(":")
    if kind in BUILTIN and not arg:
        return kind, None
    if kind in ("folder", "jsonl") and arg:
        if not (os.path.isdir if kind == "folder" else os.path.isfile)(arg):   # before anything is created
            raise GentrainError(f"--source {spec!r}: {arg} is not an existing {'folder' if kind == 'folder' else 'file'}")
        return kind, arg
    raise GentrainError(f"--source {spec!r}: expected {', '.join(BUILTIN)}, folder:PATH or jsonl:PATH")


def build_source(source: str, out_dir: str, *, size: Optional[int] = None, count: Optional[int] = None,
                 seed: int = 0, toy2d_dist: str = "checkerboard", missing_caption: str = "error",
                 max_samples: int = 1000, max_bytes: Optional[int] = None, split: str = "all",
                 bad_image: str = "fail") -> dict[str, Any]:
    """Write the shard set of a source spec (digits | shapes | toy2d | edges2digits |
    digits_inverted | folder:PATH | jsonl:PATH) into ``out_dir`` and return its index
    (``bad_image``: an unreadable image stops the build, "fail", or is left out and listed, "skip")."""
    kind, arg = parse_source(source)
    if kind in DIGIT_SOURCES:
        it = DIGIT_SOURCES[kind](size=size or 32, seed=seed, count=count, split=split)
    elif kind == "shapes":
        it = shapes_samples(size=size or 64, seed=seed, count=10000 if count is None else count)
    elif kind == "toy2d":
        it = toy2d_samples(dist=toy2d_dist, seed=seed, count=10000 if count is None else count)
        kind = f"toy2d:{toy2d_dist}"
    elif kind == "folder":
        it = folder_samples(arg, missing_caption=missing_caption)
    else:
        it = jsonl_samples(arg)
    if count is not None and kind in ("folder", "jsonl"):
        it = (s for s, _ in zip(it, range(count)))
    return write_shards(it, out_dir, max_samples=max_samples, max_bytes=max_bytes, source=source, bad_image=bad_image)
