"""The analytic shapes checker (colour / shape / size / position / count per prompt) on real
rendered scenes, mismatched captions, noise and blank images, and its evaluate entry point."""
import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gentrain.data_pipeline.sources import SHAPE_COLORS, SHAPE_KINDS, make_shape_scene
from gentrain.eval.shapes import (CHECKS, check, detect, evaluate_text_to_image_shapes, heldout_captions,
                                           label_components, parse_caption)


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1) / 127.5 - 1


@functools.lru_cache(maxsize=None)
def _scenes(n: int, size: int, seed: int):
    rows = [make_shape_scene(i, size=size, seed=seed) for i in range(n)]
    return torch.stack([_tensor(im) for im, _, _ in rows]), [c for _, c, _ in rows], [t for _, _, t in rows]


def test_parse_caption_mirrors_the_source_grammar():
    assert parse_caption("a small red circle") == {
        "objects": [{"size": "small", "color": "red", "shape": "circle"}], "relation": None}
    p = parse_caption("a large cyan triangle to the left of a small white diamond")
    assert p["relation"] == "to the left of"
    assert p["objects"] == [{"size": "large", "color": "cyan", "shape": "triangle"},
                            {"size": "small", "color": "white", "shape": "diamond"}]
    assert parse_caption("  A small  red circle BELOW a large blue square ")["relation"] == "below"
    # every caption the source writes parses back to its ground truth
    for i in range(300):
        _, cap, truth = make_shape_scene(i, size=32, seed=11)
        p = parse_caption(cap)
        assert p["relation"] == truth["relation"]
        assert p["objects"] == [{k: s[k] for k in ("size", "color", "shape")} for s in truth["shapes"]]


@pytest.mark.parametrize("caption", ["a red circle", "a small red circle next to a blue square",
                                     "a small pink circle", "a small red hexagon", "two small red circles",
                                     "a small red circle above a small red square", "",
                                     "a small red circle above", "a handwritten digit 3"])
def test_parse_errors_name_the_caption(caption):
    with pytest.raises(ValueError, match="caption '" + caption[:12]):
        parse_caption(caption)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="None"):
        parse_caption(None)


@pytest.mark.parametrize("size", [32, 64])
def test_real_scenes_pass(size):
    # measured: every check 1.000 at 32 and 64 px (these 200 scenes, and 2,000 of another seed)
    x, caps, truths = _scenes(200, size, 0)
    res = check(x, caps, details=True)
    for k in CHECKS:
        assert res[k] >= 0.97, (k, res[k])
    assert res["n"] == 200 and 0 < res["n_position"] < 200
    # per object, the detections match the ground truth: kind, size, and centre within a pixel
    hits = 0
    for objs, t in zip(res["objects"], truths):
        assert len(objs) == len(t["shapes"])
        for s in t["shapes"]:
            o = next(o for o in objs if o["color"] == s["color"])
            hits += o["shape"] == s["shape"] and o["size"] == s["size"]
            assert math.dist(o["center"], s["center"]) < 1.5
    assert hits >= 0.97 * sum(len(t["shapes"]) for t in truths)


def test_every_kind_and_colour_is_read_at_32px():
    # all 4 kinds x 8 colours x 2 sizes appear, and each is read back (the small circles are the
    # hard case at 32 px: 6-px octagons)
    x, caps, truths = _scenes(400, 32, 5)
    res = check(x, caps, details=True)
    seen, wrong = set(), []
    for objs, t in zip(res["objects"], truths):
        for s in t["shapes"]:
            seen.add((s["shape"], s["color"], s["size"]))
            o = next((o for o in objs if o["color"] == s["color"]), None)
            if o is None or (o["shape"], o["size"]) != (s["shape"], s["size"]):
                wrong.append((s, o))
    assert {k for k, _, _ in seen} == set(SHAPE_KINDS) and {c for _, c, _ in seen} == set(SHAPE_COLORS)
    assert len(wrong) <= 0.02 * sum(len(t["shapes"]) for t in truths), wrong[:3]


@pytest.mark.parametrize("size", [32, 64])
def test_mismatched_captions_score_low(size):
    # measured (these 200 scenes, captions shifted by one, 32 and 64 px alike): colour 0.110,
    # shape 0.025, size 0.055, position 0.017, count 0.540 (the number of objects often agrees
    # by chance), all 0.005
    x, caps, _ = _scenes(200, size, 0)
    res = check(x, caps[1:] + caps[:1])
    assert res["colour"] < 0.2 and res["shape"] < 0.06 and res["size"] < 0.1 and res["position"] < 0.06
    assert res["all"] < 0.03 and res["count"] < 0.7


@pytest.mark.parametrize("size", [32, 64])
def test_noise_and_blank_score_zero(size):
    # measured (200 images): colour, shape, size, position and all <= 0.005 on uniform and Gaussian
    # noise and 0 on blank images; count <= 0.02 (a lone noise blob for a one-object prompt)
    _, caps, _ = _scenes(200, size, 0)
    g = torch.Generator().manual_seed(0)
    bg = torch.tensor([16, 16, 20]).view(1, 3, 1, 1) / 127.5 - 1
    for images in (torch.rand(200, 3, size, size, generator=g) * 2 - 1,
                   torch.randn(200, 3, size, size, generator=g).clamp(-1, 1),
                   bg.expand(200, 3, size, size), torch.full((200, 3, size, size), -1.0)):
        res = check(images, caps)
        assert res["all"] <= 0.01 and res["colour"] <= 0.02 and res["count"] <= 0.05, res


def test_detect_one_image_and_position():
    img, cap, truth = make_shape_scene(3, size=64, seed=0)
    objs = detect(_tensor(img))
    assert sorted((o["color"], o["shape"], o["size"]) for o in objs) == sorted(
        (s["color"], s["shape"], s["size"]) for s in truth["shapes"])
    # swap the two objects' places: the relation no longer holds (for a two-object scene)
    i = next(i for i in range(50) if make_shape_scene(i, size=64, seed=0)[2]["relation"] == "above")
    img, cap, _ = make_shape_scene(i, size=64, seed=0)
    x = _tensor(img)
    assert check(x[None], [cap])["position"] == 1.0
    assert check(x.flip(1)[None], [cap])["position"] == 0.0  # upside down: now below
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        detect(x[None])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        check(torch.stack([x, x]), [cap])


def test_label_components_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    classes = np.where(rng.random((6, 20, 24)) < 0.5, rng.integers(0, 3, (6, 20, 24)), -1)
    lab = label_components(classes)
    for i in range(6):
        for c in range(3):
            ref, n = ndimage.label(classes[i] == c, structure=np.ones((3, 3)))
            ours = lab[i][classes[i] == c]
            assert len(np.unique(ours)) == n
            # the same partition: a bijection between our labels and scipy's
            pairs = set(zip(ours.tolist(), ref[classes[i] == c].tolist()))
            assert len(pairs) == n
    assert (lab[classes < 0] == -1).all()


class _RenderingObjective:
    """Samples the true held-out scene for each prompt (looked up by caption), or noise."""

    device = "cpu"
    guidance_scale = 2.0

    def __init__(self, size: int, seed: int, n: int, noise: bool = False):
        self.size, self.noise, self.calls = size, noise, []
        self.table = {}
        for i in range(n):
            im, cap, _ = make_shape_scene(i, size=size, seed=seed)
            self.table.setdefault(cap, _tensor(im))

    def sample(self, n, cond, *, generator=None, guidance_scale=None):
        self.calls.append((n, guidance_scale))
        assert len(cond["prompts"]) == n and isinstance(generator, torch.Generator)
        if self.noise:
            return torch.rand(n, 3, self.size, self.size, generator=generator) * 2 - 1
        return torch.stack([self.table[p] for p in cond["prompts"]])


def test_evaluate_text_to_image_shapes():
    cfg = SimpleNamespace(data=SimpleNamespace(image_size=32), eval=SimpleNamespace(num_samples=250, seed=7))
    good = _RenderingObjective(32, 7 + 12345, 250)
    out = evaluate_text_to_image_shapes(good, cfg)
    assert good.calls == [(100, None), (100, None), (50, None)]  # chunks of 100, default guidance
    assert out["eval/shapes_n"] == 250 and out["eval/guidance_scale"] == 2.0
    for k in CHECKS:
        assert out[f"eval/shapes_{k}"] >= 0.97, (k, out)
    assert heldout_captions(3, 32, 7) == [make_shape_scene(i, size=32, seed=7 + 12345)[1] for i in range(3)]

    noise = _RenderingObjective(32, 7 + 12345, 0, noise=True)
    out = evaluate_text_to_image_shapes(noise, cfg, n=120, guidance_scale=4.0, seed=1)
    assert noise.calls == [(100, 4.0), (20, 4.0)] and out["eval/guidance_scale"] == 4.0
    assert out["eval/shapes_n"] == 120 and out["eval/shapes_all"] == 0.0 and out["eval/shapes_colour"] <= 0.02


def test_check_is_fast():
    import time

    x, caps, _ = _scenes(500, 32, 1)
    t0 = time.perf_counter()
    check(x, caps)
    assert time.perf_counter() - t0 < 5.0
