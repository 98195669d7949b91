"""Image-to-image GAN data: edges2digits (paired) and digits_inverted (two unpaired domains),
built into shards and read back through the project's stream, with aligned crops and flips."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers.shards import png, take
from gentrain.data_pipeline.build import build_stream
from gentrain.data_pipeline.config import DataConfig
from gentrain.data_pipeline.batches import collate
from gentrain.data_pipeline.decode import BadSample, DecodeOptions, decode_sample
from gentrain.data_pipeline.sources import (build_source, digits_inverted_samples, edge_map,
                                            thick_inverted)
from gentrain.data_pipeline.writer import ShardSetWriter, write_shards
from gentrain.errors import DataError
from gentrain.launch.cli import main as cli_main

N_TEST = 297  # digits[1500:]


def _stream(path, batch_size=N_TEST, **kw):
    cfg = DataConfig(source="shards", shards=str(path), image_size=16, channels=1, **kw)
    return build_stream(cfg, batch_size=batch_size, rank=0, world_size=1, seed=3)


def _pixels(x: torch.Tensor) -> np.ndarray:
    """(1, H, W) in [-1, 1] -> (H, W) uint8."""
    return ((x[0] + 1) * 127.5).round().to(torch.uint8).numpy()


def test_edges2digits_via_cli_paired_and_aligned_under_flip(tmp_path, capsys):
    edges = tmp_path / "edges2digits16" / "test"
    assert cli_main(["data", "build", "--source", "edges2digits", "--split", "test", "--size", "16",
                     "--out", str(edges), "--shard-samples", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == N_TEST
    idx = json.loads((edges / "index.json").read_text())
    assert idx["samples"] == N_TEST and len(idx["shards"]) == 3 and idx["image_sizes"] == {"16x16": N_TEST}
    plain = take(_stream(edges), 1)[0]
    flipped = take(_stream(edges, random_flip=True), 1)[0]
    for b in (plain, flipped):
        assert set(b) == {"key", "txt", "label", "epoch", "image", "input"}
        for k in ("image", "input"):
            assert b[k].shape == (N_TEST, 1, 16, 16) and b[k].dtype == torch.float32
            assert b[k].min() >= -1 and b[k].max() <= 1
        assert set(b["input"].unique().tolist()) == {-1.0, 1.0}  # binary edge lines
        assert 0.05 < float((b["input"] > 0).float().mean()) < 0.5  # lines, not filled strokes
        assert set(b["label"].tolist()) == set(range(10)) and all(b["txt"])
    original = {k: _pixels(x) for k, x in zip(plain["key"], plain["image"])}
    n_flipped = 0
    for key, target, source in zip(flipped["key"], flipped["image"], flipped["input"]):
        t = _pixels(target)
        # the input is the edge map of the (possibly flipped) target it came with
        assert np.array_equal(np.asarray(edge_map(Image.fromarray(t))), _pixels(source)), key
        if not np.array_equal(t, original[key]):
            assert np.array_equal(t, original[key][:, ::-1]), key
            n_flipped += 1
    assert 0.3 * N_TEST < n_flipped < 0.7 * N_TEST


def test_paired_images_share_the_random_crop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 20), dtype=np.uint8)
    raw = {"__key__": "k", "png": png(a), "input.png": png(255 - a), "txt": b"x"}
    opts = DecodeOptions(image_size=8, channels=1, random_crop=True, random_flip=True)
    lefts = set()
    for seed in range(12):
        s = decode_sample(raw, opts, random.Random(seed))
        assert np.array_equal(s["input"], 255 - s["image"])  # same crop, same flip
        img = s["image"][:, :, 0]
        lefts.add(next(i for i in range(13) if np.array_equal(img, a[:, i:i + 8])
                       or np.array_equal(img[:, ::-1], a[:, i:i + 8])))
    assert len(lefts) > 3  # the crops did move
    # a sample's images must have one size
    with pytest.raises(BadSample, match="input.png member is 4x4, the main image 20x8") as e:
        decode_sample({**raw, "input.png": png(a[:4, :4])}, opts, random.Random(0))
    assert e.value.reason == "mismatched_image"


def test_digits_inverted_unpaired_domains(tmp_path):
    out = tmp_path / "digits_inverted16" / "test"
    idx = build_source("digits_inverted", str(out), size=16, split="test")
    assert idx["samples"] == N_TEST and idx["image_sizes"] == {"16x16": N_TEST}
    b = take(_stream(out), 1)[0]
    assert set(b) == {"key", "txt", "label", "epoch", "image", "image_b", "label_b"}
    assert b["image_b"].shape == (N_TEST, 1, 16, 16) and b["image_b"].min() >= -1 and b["image_b"].max() <= 1
    assert b["label_b"].dtype == torch.long and set(b["label_b"].tolist()) == set(range(10))
    assert float((b["label"] != b["label_b"]).float().mean()) > 0.8
    # B is another digit of the split, thickened and inverted: light background, dark strokes
    a_by_key = {k: _pixels(x) for k, x in zip(b["key"], b["image"])}
    partner = {s["__key__"]: json.loads(s["json"])["index_b"] for s in digits_inverted_samples(size=16, split="test")}
    assert all(f"digits_inverted_{j:05d}" != k for k, j in partner.items())
    assert sorted(partner.values()) == list(range(1500, 1797))  # every image used once as B
    for key, xb in zip(b["key"], b["image_b"]):
        src = a_by_key[f"digits_inverted_{partner[key]:05d}"]
        assert np.array_equal(_pixels(xb), np.asarray(thick_inverted(Image.fromarray(src)))), key
    assert float(b["image_b"].mean()) > float(b["image"].mean()) + 0.3
    corners = b["image_b"][:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert float(corners.mean()) > 0.8  # white background
    # label_b absent -> -1
    raw = {"__key__": "k", "png": png(np.zeros((4, 4), np.uint8)), "b.png": png(np.zeros((4, 4), np.uint8)),
           "txt": b"x", "json": b'{"label": 3}'}
    s = collate([decode_sample(raw, DecodeOptions(image_size=4, channels=1))])
    assert s["label_b"].tolist() == [-1] and s["image_b"].shape == (1, 1, 4, 4)
    with pytest.raises(BadSample, match="label_b 'x'"):
        decode_sample({**raw, "json": b'{"label_b": "x"}'}, DecodeOptions(image_size=4, channels=1))


def _paired(key: str, i: int) -> dict:
    a = np.full((8, 8), i * 20, np.uint8)
    return {"__key__": key, "png": png(a), "input.png": png(a), "txt": "c", "json": json.dumps({"label": i})}


def test_a_corrupt_extra_image_is_named(tmp_path):
    bad = {**_paired("k3", 3), "input.png": b"\x89PNG\r\n\x1a\n" + os.urandom(64)}
    with pytest.raises(DataError, match=r"sample 'k3': its input.png member is not a readable image"):
        write_shards([_paired("k0", 0), bad], str(tmp_path / "strict"))
    w = ShardSetWriter(str(tmp_path / "s"), check_images=False)
    for i in range(10):
        w.write(bad if i == 3 else _paired(f"k{i}", i))
    w.close()
    with pytest.raises(DataError, match=r"\(corrupt_image\) in shard .*000000.tar, key k3: input.png member: "):
        take(_stream(tmp_path / "s", batch_size=3, bad_sample_policy="fail", shuffle_buffer=1), 4)
    st = _stream(tmp_path / "s", batch_size=3, max_bad_fraction=0.5)
    keys = [k for b in take(st, 3) for k in b["key"]]
    assert sorted(keys) == sorted(f"k{i}" for i in range(10) if i != 3)
    assert st.stats()["bad/corrupt_image"] == 1
