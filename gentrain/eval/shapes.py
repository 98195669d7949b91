"""An analytic checker for text-to-image samples of the procedural ``shapes`` source.

This is NOT a learned metric: no network, no training. It reads a sample with fixed,
hand-written rules derived from how :func:`~gentrain.data_pipeline.sources.make_shape_scene`
draws a scene (palette, background, shape outlines, radii), and checks it against its prompt.

Per prompt ("a small red circle above a large blue square") it measures:

* ``colour``   every named colour is present as an object;
* ``shape``    the object of each named colour has the named kind (circle/square/triangle/diamond);
* ``size``     ... and the named size (small/large);
* ``position`` the named relation (above/below/to the left of/to the right of) holds between the
  two named objects -- two-object prompts only (its accuracy is over those prompts; NaN when the
  batch has none);
* ``count``    the number of objects found equals the number named;
* ``all``      every check of that prompt passes (``position`` only where it applies).

How an image is read (:func:`detect`):

1. pixels: each pixel is projected on the segment from the background (16, 16, 20) to every
   palette colour (``SHAPE_COLORS``) and takes the colour whose segment it lies closest to -- so
   an edge pixel blended with the background keeps its hue. It is foreground when it is at least
   half-way from the background to that colour (``alpha >= 0.5``) and near the segment
   (residual < 30% of the segment's length);
2. objects: 8-connected components of foreground pixels of one colour (a vectorised label
   propagation in numpy, no scipy). Components under 0.7% of the image (half the smallest shape
   the source draws) or that fit no outline (best IoU below 0.6; real shapes fit at >= 0.75) are
   not objects -- that is what keeps noise at ~0;
3. kind: each of the four outlines, as ``_draw_shape`` draws them around a centre with radius r
   -- square (the 2r box), circle (inscribed disc), diamond (|dx| + |dy| <= r: widest in the
   middle), triangle (apex at the top centre, base along the bottom edge: widest at the bottom,
   its centroid r/3 below the centre) -- is fitted by moments: the radius that gives the component's area
   (and 0.95x, 1.05x of it), centred on the centroid. The best IoU (pixels covered in part count
   in part) wins. Moments, unlike a bounding box, barely move for a stray pixel or a blurred tip.
   At 8 px across or less the IoU cannot tell a circle from a diamond (the source's 6-px circles are
   octagons that fit a diamond best), so there the share of the bounding box filled (disc
   pi/4, diamond 1/2) also counts between those two;
4. size: the fitted radius against the image size; the source draws small shapes with a radius
   of 8-12% of the size and large ones with 17-22% (plus ~half a pixel of rasterisation), so the
   cut is at 14.5% + 0.5 px;
5. position: the fitted centre (the centre the source draws around), compared like
   ``sources._relation`` (the larger offset decides), with a tolerance of 3% of the image size
   on near-diagonal ties.

Measured on real scenes rendered at 32 and 64 px (2,000 each): every check 1.000; captions of
other scenes: colour ~0.1, all ~0; noise and blank images: ~0. On scenes blurred (0.7 px at
32 px, 1 px at 64 px, plus noise) shape drops to ~0.99, and on 64-px scenes downsampled to 32 px
(bicubic, as the data pipeline does when shards are bigger than ``image_size``) to ~0.88: small
shapes 5-8 px across lose the corners and tips that tell them apart. Read the shape score of
such a run against that ceiling.

The figures hold for images shown the way the source drew them: a model trained with horizontal
flips (``data.random_flip``) cannot learn left/right, and its ``position`` score says so.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import numpy as np
import torch

from gentrain.data_pipeline.sources import SHAPE_COLORS, SHAPE_KINDS, make_shape_scene

BACKGROUND = (16, 16, 20)  # make_shape_scene's background
COLOR_NAMES = tuple(sorted(SHAPE_COLORS))
RELATIONS = ("above", "below", "to the left of", "to the right of")
SIZES = ("small", "large")
ATTRIBUTES = ("colour", "shape", "size", "position", "count")
CHECKS = (*ATTRIBUTES, "all")

MIN_ALPHA = 0.5          # foreground: at least half-way from the background to a palette colour
MAX_RESIDUAL = 0.3       # ... and off its bg->colour segment by under 30% of the segment's length
MIN_AREA_FRAC = 0.007    # components under this share of the image are dropped (the smallest shape: ~1.4%)
MIN_IOU = 0.6            # a component is an object when some kind's outline fits it this well (shapes: >= 0.75)
TINY_BOX = 8             # px: objects at most this wide/tall also weigh their box fill (circle vs diamond)
FILL_WEIGHT = 1.5        # ... by this much per unit of fill off the ideal
LARGE_RADIUS = 0.145     # fitted radius / image size above which an object is "large" (small 0.08-0.12, large 0.17-0.22)
TIE_TOLERANCE = 0.03     # position: near-diagonal ties within 3% of the size count either way

_PHRASE = (rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOR_NAMES)}) ({'|'.join(SHAPE_KINDS)})")
_CAPTION_RE = re.compile(rf"^{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE})?$")


def parse_caption(caption: str) -> dict[str, Any]:
    """The objects and relation a ``shapes`` caption names, mirroring ``make_shape_scene``'s
    grammar: ``a {size} {color} {shape}`` or ``a {size} {color} {shape} {relation} a {size}
    {color} {shape}``. Returns ``{"objects": [{"size", "color", "shape"}, ...], "relation":
    str or None}`` (the relation says where the first object is relative to the second).
    Case and runs of spaces are forgiven; anything else raises ValueError naming the caption."""
    if not isinstance(caption, str):
        raise ValueError(f"caption {caption!r}: expected a string")
    m = _CAPTION_RE.match(" ".join(caption.lower().split()))
    if m is None:
        raise ValueError(f"caption {caption!r} does not parse as a shapes caption "
                         f"('a SIZE COLOR SHAPE' [RELATION 'a SIZE COLOR SHAPE']; sizes {SIZES}, "
                         f"colors {COLOR_NAMES}, shapes {SHAPE_KINDS}, relations {RELATIONS})")
    g = m.groups()
    objects = [{"size": g[0], "color": g[1], "shape": g[2]}]
    if g[3] is not None:
        objects.append({"size": g[4], "color": g[5], "shape": g[6]})
        if objects[0]["color"] == objects[1]["color"]:
            raise ValueError(f"caption {caption!r} names the colour {g[1]!r} twice; the checker tells "
                             f"objects apart by colour (the shapes source never repeats one)")
    return {"objects": objects, "relation": g[3]}


# ----------------------------------------------------------------------------------- pixels

def _as_batch(images: Any) -> np.ndarray:
    """(N, H, W, 3) float32 in 0..255 from (N, 3, H, W) (or one (3, H, W)) in [-1, 1]."""
    x = images.detach().cpu().float().numpy() if torch.is_tensor(images) else np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W) or (3, H, W) in [-1, 1], got {tuple(x.shape)}")
    return (np.clip(x, -1, 1).transpose(0, 2, 3, 1) + 1) * 127.5


def classify_pixels(images: Any) -> np.ndarray:
    """(N, H, W) int: the palette colour index (into ``COLOR_NAMES``) of each foreground pixel, -1
    for background. See the module doc, step 1."""
    return _classify(_as_batch(images))


def _classify(x: np.ndarray) -> np.ndarray:
    bg = np.asarray(BACKGROUND, np.float32)
    d = np.asarray([SHAPE_COLORS[c] for c in COLOR_NAMES], np.float32) - bg        # (K, 3)
    dd = (d * d).sum(1)
    q = (x - bg).reshape(-1, 3)
    out = np.full(len(q), -1, np.int64)
    # a pixel nearer the background than half the shortest segment is background for every colour
    # (alpha_k <= |q| / |d_k| < 1/2): skip those (most of a scene) before the (P, K) products
    qq = (q * q).sum(1)
    cand = np.flatnonzero(qq >= (MIN_ALPHA ** 2) * dd.min())
    q, qq = q[cand], qq[cand]
    qd = q @ d.T                                                                     # (P, K)
    alpha = np.clip(qd / dd, 0.0, 1.0)
    res2 = qq[:, None] - 2 * alpha * qd + alpha * alpha * dd                         # |q - alpha d|^2
    k = res2.argmin(1)
    a, r2 = np.take_along_axis(alpha, k[:, None], 1)[:, 0], np.take_along_axis(res2, k[:, None], 1)[:, 0]
    fg = (a >= MIN_ALPHA) & (r2 < (MAX_RESIDUAL ** 2) * dd[k])
    out[cand[fg]] = k[fg]
    return out.reshape(x.shape[:3])


def label_components(classes: np.ndarray) -> np.ndarray:
    """(N, H, W) int64 component labels of 8-connected same-class foreground pixels (class >= 0);
    each component is labelled by the smallest flat index of its pixels, background -1.
    Vectorised over the batch: min-label propagation with pointer jumping."""
    n, h, w = classes.shape
    fg = classes >= 0
    big = n * h * w
    lab = np.where(fg, np.arange(big).reshape(n, h, w), big)
    # pad with background so shifted views need no bounds checks
    cp = np.full((n, h + 2, w + 2), -1, classes.dtype)
    cp[:, 1:-1, 1:-1] = classes
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    same = [fg & (cp[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes) for dy, dx in shifts]
    flat_ext = np.empty(big + 1, np.int64)
    while True:
        lp = np.full((n, h + 2, w + 2), big, np.int64)
        lp[:, 1:-1, 1:-1] = lab
        new = lab
        for (dy, dx), s in zip(shifts, same):
            new = np.where(s, np.minimum(new, lp[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        # pointer jumping: a label is a pixel of the same component; take that pixel's label
        flat_ext[:big], flat_ext[big] = new.reshape(-1), big
        for _ in range(4):
            new = flat_ext[new]
            flat_ext[:big] = new.reshape(-1)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, lab, -1)


# ----------------------------------------------------------------------------------- objects

# Each kind as _draw_shape draws it around (cx, cy) with radius r, in units of r (v points down):
# its area (in r^2) and how far its centroid sits below the centre (in r).
AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "diamond": 0.0}


def _inside(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether (u, v), in units of r from the centre (v down), lies inside ``kind``."""
    if kind == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)  # triangle: apex (0, -1), base (-1, 1)..(1, 1)


_SUB = (np.arange(3) + 0.5) / 3 - 0.5  # 3 x 3 samples in a pixel: its covered share
SCALES = (0.95, 1.0, 1.05)  # radii tried, relative to the one of equal area


def _coverage(kind: str, u: np.ndarray, v: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Share of each pixel (centre u, v; side ``step``, all in units of r) inside ``kind``."""
    cov = np.zeros(u.shape, np.float64)
    for a in _SUB:
        for b in _SUB:
            cov += _inside(kind, u + a * step, v + b * step)
    return cov / len(_SUB) ** 2


def _objects(x: np.ndarray) -> list[list[dict[str, Any]]]:
    """Per image of (N, H, W, 3) in 0..255, the objects found (see :func:`detect`), vectorised
    over the batch."""
    classes = _classify(x)
    n, h, w = classes.shape
    lab = label_components(classes)
    flat = lab.reshape(-1)
    pix = np.flatnonzero(flat >= 0)
    out: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    if len(pix) == 0:
        return out
    comp, inv, area = np.unique(flat[pix], return_inverse=True, return_counts=True)
    keep = area >= max(3.0, MIN_AREA_FRAC * h * w)  # drop tiny components before the fits
    comp, area, remap = comp[keep], area[keep], np.cumsum(keep) - 1
    sel = keep[inv]
    pix, inv = pix[sel], remap[inv[sel]]
    if len(comp) == 0:
        return out
    xs, ys = (pix % w) + 0.5, ((pix // w) % h) + 0.5  # pixel centres
    mx, my = np.bincount(inv, xs) / area, np.bincount(inv, ys) / area
    order = np.argsort(inv, kind="stable")
    starts = np.r_[0, np.cumsum(area)[:-1]]
    box_w = np.maximum.reduceat(xs[order], starts) - np.minimum.reduceat(xs[order], starts) + 1
    box_h = np.maximum.reduceat(ys[order], starts) - np.minimum.reduceat(ys[order], starts) + 1
    fill = area / (box_w * box_h)
    # each kind fitted by moments: the radius giving the component's area, the centre from the
    # centroid; then the IoU of the component with that ideal outline (pixels covered in part count
    # in part). Moments, unlike a bounding box, barely move for a stray pixel or a blurred tip.
    ious, radii, centres = [], [], []
    for k in SHAPE_KINDS:
        r0 = np.sqrt(area / AREA[k])
        best_iou, best_r = np.full(len(comp), -1.0), r0.copy()
        for f in SCALES:  # a blurred corner or a stray pixel moves the area: try radii around it
            r = r0 * f
            cy = my - CENTROID_DROP[k] * r
            inter = np.bincount(inv, _coverage(k, (xs - mx[inv]) / r[inv], (ys - cy[inv]) / r[inv], 1.0 / r[inv]),
                                len(comp))
            score = inter / (area + AREA[k] * r * r - inter)
            better = score > best_iou
            best_iou, best_r = np.where(better, score, best_iou), np.where(better, r, best_r)
        ious.append(best_iou), radii.append(best_r), centres.append(my - CENTROID_DROP[k] * best_r)
    iou, rad, cys = np.stack(ious, 1), np.stack(radii, 1), np.stack(centres, 1)
    kind = iou.argmax(1)
    best = iou[np.arange(len(comp)), kind]
    # at 8 px across or less, outlines are too coarse for the IoU to tell a circle from a diamond (the
    # source's 6-px circles are octagons, which fit a diamond best): there the share of the box
    # filled decides between those two (disc pi/4, diamond 1/2; 6-px circles 0.67, diamonds ~0.5)
    ci, di = SHAPE_KINDS.index("circle"), SHAPE_KINDS.index("diamond")
    tiny = (np.maximum(box_w, box_h) <= TINY_BOX) & ((kind == ci) | (kind == di))
    pen_c = iou[:, ci] - FILL_WEIGHT * np.abs(fill - math.pi / 4)
    pen_d = iou[:, di] - FILL_WEIGHT * np.abs(fill - 0.5)
    kind = np.where(tiny, np.where(pen_c >= pen_d, ci, di), kind)
    r, cy = rad[np.arange(len(comp)), kind], cys[np.arange(len(comp)), kind]
    img, color = comp // (h * w), classes.reshape(-1)[comp]
    size = max(h, w)
    for c in np.flatnonzero(best >= MIN_IOU):
        out[img[c]].append({
            "color": COLOR_NAMES[color[c]], "shape": SHAPE_KINDS[kind[c]],
            "size": "large" if r[c] > LARGE_RADIUS * size + 0.5 else "small",
            "center": (float(mx[c]), float(cy[c])), "radius": float(r[c]), "area": int(area[c]),
            "box": (int(box_w[c]), int(box_h[c])),
            "iou": {k: round(float(iou[c, j]), 4) for j, k in enumerate(SHAPE_KINDS)},
        })
    for objs in out:
        objs.sort(key=lambda o: -o["area"])
    return out


def detect(image: Any) -> list[dict[str, Any]]:
    """The objects in one image (3, H, W) in [-1, 1], largest first: dicts with ``color``,
    ``shape``, ``size``, ``center`` (x, y) and ``radius`` of the fitted outline in pixels (the
    centre and radius the source draws with, plus ~half a pixel of rasterisation on the radius),
    ``area`` (pixels), ``box`` (width, height of the bounding box) and ``iou`` (the best fit of
    each kind's outline). Analytic rules, see the module doc."""
    if len(getattr(image, "shape", ())) != 3:
        raise ValueError(f"detect: expected one image (3, H, W), got {tuple(getattr(image, 'shape', ()))}; "
                         f"use check() for batches")
    return _objects(_as_batch(image))[0]


def _relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], tol: float) -> bool:
    """Whether a is ``rel`` of b, as sources._relation decides it (the larger offset of the
    centres), counting near-diagonal ties within ``tol`` pixels either way."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if rel in ("above", "below"):
        return (dy < 0 if rel == "above" else dy > 0) and abs(dy) >= abs(dx) - tol
    return (dx < 0 if rel == "to the left of" else dx > 0) and abs(dx) >= abs(dy) - tol


def check_one(objects: Sequence[dict[str, Any]], parsed: dict[str, Any], size: int) -> dict[str, Optional[bool]]:
    """The checks of one prompt (parsed) on the objects detected in its image; ``position`` is
    None for one-object prompts."""
    named = parsed["objects"]
    found = []
    for o in named:  # the object of a named colour: the largest component of that colour
        found.append(next((d for d in objects if d["color"] == o["color"]), None))
    res: dict[str, Optional[bool]] = {
        "colour": all(f is not None for f in found),
        "shape": all(f is not None and f["shape"] == o["shape"] for f, o in zip(found, named)),
        "size": all(f is not None and f["size"] == o["size"] for f, o in zip(found, named)),
        "count": len(objects) == len(named),
        "position": None,
    }
    if parsed["relation"] is not None:
        res["position"] = (found[0] is not None and found[1] is not None
                           and _relation_holds(parsed["relation"], found[0]["center"], found[1]["center"],
                                               TIE_TOLERANCE * size))
    res["all"] = all(v for v in res.values() if v is not None)
    return res


def check(images: Any, captions: Sequence[str], *, details: bool = False) -> dict[str, Any]:
    """Accuracies over a batch of images (N, 3, H, W) in [-1, 1] and their N captions: the share
    of prompts passing each of ``colour``, ``shape``, ``size``, ``position`` (over two-object
    prompts only; NaN if there are none), ``count`` and ``all`` (module doc), plus ``n`` and
    ``n_position`` (the counts behind them). ``details=True`` adds ``per_prompt`` (the checks of
    each prompt) and ``objects`` (what :func:`detect` found in each image)."""
    x = _as_batch(images)  # validates
    if len(captions) != len(x):
        raise ValueError(f"check: {len(x)} images but {len(captions)} captions")
    parsed = [parse_caption(c) for c in captions]
    objects = _objects(x)
    size = max(x.shape[1:3])
    per = [check_one(o, p, size) for o, p in zip(objects, parsed)]
    out: dict[str, Any] = {}
    for k in CHECKS:
        vals = [r[k] for r in per if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else math.nan
    out["n"], out["n_position"] = len(per), sum(r["position"] is not None for r in per)
    if details:
        out["per_prompt"], out["objects"] = per, objects
    return out


def beats(trained: dict, untrained: dict, margin: float) -> list[str]:
    """The attributes (``ATTRIBUTES``) on which the accuracies ``trained`` do NOT beat ``untrained`` by more
    than ``margin`` (empty: they beat them on every one)."""
    return [k for k in ATTRIBUTES if not trained[k] > untrained[k] + margin]


HELDOUT_SEED_OFFSET = 12345  # held-out scenes: make_shape_scene(i, seed=cfg.eval.seed + this)


def heldout_captions(n: int, size: int, seed: int) -> list[str]:
    """The captions of the held-out scenes ``make_shape_scene(i, size=size, seed=seed +
    HELDOUT_SEED_OFFSET)``, i < n (``seed`` is ``cfg.eval.seed``; shards use other seeds)."""
    return [make_shape_scene(i, size=size, seed=seed + HELDOUT_SEED_OFFSET)[1] for i in range(n)]


@torch.no_grad()
def evaluate_text_to_image_shapes(objective: Any, cfg: Any, n: Optional[int] = None,
                                  guidance_scale: Optional[float] = None, seed: int = 0,
                                  batch_size: int = 100) -> dict[str, float]:
    """Sample one image per caption of n held-out shapes scenes (n = ``cfg.eval.num_samples`` by
    default; scenes at ``cfg.data.image_size``, seed ``cfg.eval.seed`` + 12345) and score them
    with :func:`check`: ``eval/shapes_{colour,shape,size,position,count,all}`` (shares of prompts
    passing; position over two-object prompts), ``eval/shapes_n``, ``eval/shapes_n_position`` and
    ``eval/guidance_scale`` (when known). Sampling: ``objective.sample`` in chunks of
    ``batch_size`` with one generator seeded ``seed``. An analytic checker, not a learned metric."""
    n = int(cfg.eval.num_samples if n is None else n)
    if n < 1:
        raise ValueError(f"evaluate_text_to_image_shapes: n={n}, need at least 1 prompt")
    prompts = heldout_captions(n, int(cfg.data.image_size), int(cfg.eval.seed))
    g = torch.Generator(objective.device).manual_seed(seed)
    chunks = []
    for i in range(0, n, batch_size):
        p = prompts[i:i + batch_size]
        chunks.append(objective.sample(len(p), {"prompts": p}, generator=g, guidance_scale=guidance_scale)
                      .detach().float().clamp(-1, 1).cpu())
    res = check(torch.cat(chunks), prompts)
    out = {f"eval/shapes_{k}": float(res[k]) for k in CHECKS}
    out["eval/shapes_n"], out["eval/shapes_n_position"] = float(res["n"]), float(res["n_position"])
    scale = guidance_scale if guidance_scale is not None else objective.guidance_scale
    if scale is not None:
        out["eval/guidance_scale"] = float(scale)
    return out
