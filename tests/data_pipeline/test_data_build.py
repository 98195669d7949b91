"""Shard writing and the built-in sources: index, atomicity, captions, round trips, the CLI."""
from __future__ import annotations

import argparse
import json
import os
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers.shards import sample, stream, take
from gentrain.launch.data_commands import add_build_arguments, parse_bytes, run_build
from gentrain.data_pipeline.sources import (DIGIT_WORDS, build_source, make_shape_scene, shapes_samples)
from gentrain.data_pipeline.writer import write_shards
from gentrain.errors import DataError, GentrainError


def _cli(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_build_arguments(p)
    return p.parse_args(argv)


def test_index_and_shard_limits(tmp_path):
    idx = write_shards((sample(f"k{i}", i) for i in range(25)), str(tmp_path / "n"), max_samples=10, source="t")
    assert [s["samples"] for s in idx["shards"]] == [10, 10, 5]
    assert idx["samples"] == 25 and idx["image_sizes"] == {"8x8": 25} and idx["source"] == "t"
    assert json.loads((tmp_path / "n" / "index.json").read_text()) == idx
    assert sorted(os.listdir(tmp_path / "n")) == ["000000.tar", "000001.tar", "000002.tar", "index.json"]
    one = sum(len(v) + 1024 for k, v in sample("k0", 0).items() if k != "__key__")
    idx = write_shards((sample(f"k{i}", i) for i in range(25)), str(tmp_path / "b"), max_bytes=4 * one + 10)
    assert all(s["samples"] <= 4 for s in idx["shards"]) and idx["samples"] == 25
    assert parse_bytes("1.5KB") == 1500 and parse_bytes("2MiB") == 2 * 1024**2 and parse_bytes("77") == 77


def test_a_failed_write_leaves_no_partial_shard(tmp_path):
    def samples():
        for i in range(15):
            yield sample(f"k{i}", i)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        write_shards(samples(), str(tmp_path), max_samples=10)
    # the complete shard stays, the half-written one is gone, and there is no index
    assert sorted(os.listdir(tmp_path)) == ["000000.tar"]
    with tarfile.open(tmp_path / "000000.tar") as tf:
        assert len(tf.getnames()) == 30
    with pytest.raises(DataError, match="twice"):
        write_shards([sample("k", 0), sample("k", 1)], str(tmp_path / "dup"))


def test_digits_source(tmp_path):
    idx = build_source("digits", str(tmp_path), size=16, count=200, max_samples=64)
    assert idx["samples"] == 200 and idx["image_sizes"] == {"16x16": 200}
    b = take(stream(str(tmp_path), batch_size=200, image_size=16, channels=1), 1)[0]
    assert b["image"].shape == (200, 1, 16, 16)
    assert set(b["label"].tolist()) == set(range(10))
    captions = set(b["txt"])
    assert len(captions) > 50  # varied
    for txt, label in zip(b["txt"], b["label"].tolist()):
        assert str(label) in txt or DIGIT_WORDS[label] in txt
    assert any(DIGIT_WORDS[l] in t for t, l in zip(b["txt"], b["label"].tolist()))
    assert any(re.search(rf"\b{l}\b", t) for t, l in zip(b["txt"], b["label"].tolist()))
    assert b["image"].std() > 0.3  # real strokes, not blank


def test_shapes_are_deterministic_and_captions_match_truth():
    a = [s["png"] for s in shapes_samples(size=32, seed=5, count=5)]
    assert a == [s["png"] for s in shapes_samples(size=32, seed=5, count=5)]
    assert a != [s["png"] for s in shapes_samples(size=32, seed=6, count=5)]
    for i in range(40):
        img, caption, truth = make_shape_scene(i, size=48, seed=1)
        for s in truth["shapes"]:
            assert f"{s['size']} {s['color']} {s['shape']}" in caption
            cx, cy = (round(v) for v in s["center"])
            px = np.array(img)[cy, cx]
            assert px.max() > 100  # the shape is drawn where the truth says
        if truth["relation"]:
            a, b = truth["shapes"]
            assert truth["relation"] in caption
            if truth["relation"] == "above":
                assert a["center"][1] < b["center"][1]


def test_toy2d_source(tmp_path):
    build_source("toy2d", str(tmp_path), count=64, toy2d_dist="8gaussians", max_samples=20)
    b = take(stream(str(tmp_path), batch_size=64), 1)[0]
    assert b["x"].shape == (64, 2) and b["x"].dtype == torch.float32
    r = b["x"].norm(dim=1)
    assert ((r > 1.2) & (r < 2.8)).float().mean() > 0.9  # 8 modes on the radius-2 circle


def _folder(root, n=6):
    os.makedirs(root / "sub")
    arrays = {}
    for i in range(n):
        rel = f"sub/im{i}.png" if i % 2 else f"im{i}.png"
        a = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / rel)
        arrays[rel] = a
    return arrays


def test_folder_round_trip_same_pixels_and_captions(tmp_path):
    root = tmp_path / "imgs"
    arrays = _folder(root)
    captions = {rel: f"a photo number {i}, with commas" for i, rel in enumerate(sorted(arrays))}
    for rel, cap in list(captions.items())[:3]:  # sidecar .txt for half, captions.csv for the rest
        (root / rel).with_suffix(".txt").write_text(cap)
    with open(root / "captions.csv", "w") as f:
        f.write("file,caption\n" + "".join(f'{rel},"{cap}"\n' for rel, cap in list(captions.items())[3:]))
    assert run_build(_cli("--source", f"folder:{root}", "--out", str(tmp_path / "s"), "--shard-samples", "4")) == 0
    b = take(stream(str(tmp_path / "s"), batch_size=6, image_size=12), 1)[0]
    meta = {}
    with tarfile.open(tmp_path / "s" / "000000.tar") as tf:
        for m in tf:
            if m.name.endswith(".json"):
                meta[m.name.split(".")[0]] = json.load(tf.extractfile(m))["file"]
    for key, img, txt in zip(b["key"], b["image"], b["txt"]):
        rel = meta.get(key)
        if rel is None:
            continue  # in the second shard
        pixels = ((img.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels, arrays[rel]), rel
        assert txt == captions[rel]
    assert sorted(b["txt"]) == sorted(captions.values())
    with pytest.raises(GentrainError, match="already holds"):
        run_build(_cli("--source", f"folder:{root}", "--out", str(tmp_path / "s")))


def test_folder_missing_caption_and_jsonl(tmp_path):
    root = tmp_path / "imgs"
    arrays = _folder(root, n=3)
    with pytest.raises(DataError, match="no caption"):
        build_source(f"folder:{root}", str(tmp_path / "a"))
    (root / sorted(arrays)[0]).with_suffix(".txt").write_text("only one")
    assert build_source(f"folder:{root}", str(tmp_path / "b1"), missing_caption="skip")["samples"] == 1
    assert build_source(f"folder:{root}", str(tmp_path / "b2"), missing_caption="empty")["samples"] == 3
    os.unlink((root / sorted(arrays)[0]).with_suffix(".txt"))
    with open(root / "captions.jsonl", "w") as f:
        for i, rel in enumerate(sorted(arrays)):
            f.write(json.dumps({"file": rel, "caption": f"c{i}"}) + "\n")
    assert build_source(f"folder:{root}", str(tmp_path / "c"))["samples"] == 3
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"imgs/{rel}", "caption": f"m{i}", "label": i}) + "\n"
                                for i, rel in enumerate(sorted(arrays))))
    build_source(f"jsonl:{manifest}", str(tmp_path / "d"))
    b = take(stream(str(tmp_path / "d"), batch_size=3, image_size=12, shuffle_buffer=1), 1)[0]
    assert sorted(zip(b["txt"], b["label"].tolist())) == [("m0", 0), ("m1", 1), ("m2", 2)]
    with pytest.raises(GentrainError, match="expected digits"):
        run_build(_cli("--source", "mnist", "--out", str(tmp_path / "e")))


def test_two_shapes_never_overlap():
    for i in range(200):
        _, _, truth = make_shape_scene(i, size=32, seed=2)
        if len(truth["shapes"]) == 2:
            a, b = (s["bbox"] for s in truth["shapes"])
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], truth
