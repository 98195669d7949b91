"""Real datasets at scale (issue 12): img2dataset folders as they are, `gentrain data index`,
json filters, JPEG draft decoding, the scan report."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_helpers.img2dataset import jpeg, write_img2dataset
from data_helpers.shards import keys_of, stream, take, write_uneven
from gentrain.data_pipeline.decode import DecodeOptions, decode_sample
from gentrain.data_pipeline.shardlist import resolve_shards
from gentrain.errors import GentrainError

pytestmark = pytest.mark.data_scale


def test_img2dataset_folder_reads_as_it_is(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    kept = write_img2dataset(str(tmp_path), shards=3, per_shard=10, failed=((1, 3), (2, 0)))
    assert len(kept) == 28
    # the failed downloads are in the parquet and stats, not in the tar
    import pyarrow.parquet as pq

    rows = pq.read_table(str(tmp_path / "00001.parquet")).to_pylist()
    assert [r["status"] for r in rows].count("failed_to_download") == 1 and len(rows) == 10
    shards = resolve_shards(str(tmp_path))
    assert shards.counts == (10, 9, 9) and shards.scanned == 0   # from the stats files, no scan
    assert capsys.readouterr().err == ""
    # one epoch holds every sample that made it into a tar, exactly once
    batches = take(stream(str(tmp_path), batch_size=28, image_size=32), 1)
    assert sorted(keys_of(batches)) == sorted(kept)
    assert batches[0]["image"].shape == (28, 3, 32, 32)
    assert set(batches[0]["txt"]) == {r["caption"] for r in kept.values()}


def test_folder_without_stats_is_counted_once_and_said(tmp_path, capsys):
    write_img2dataset(str(tmp_path), shards=2, per_shard=6, parquet=False, stats=False, failed=())
    shards = resolve_shards(str(tmp_path))
    assert shards.counts == (6, 6) and shards.scanned == 2
    st = stream(str(tmp_path), batch_size=4, image_size=16)
    err = capsys.readouterr().err
    assert err.count("counted by reading their tar headers") == 1 and "gentrain data index" in err
    assert len(take(st, 3)) == 3


def test_json_filters_skip_before_decoding_and_are_counted(tmp_path):
    pytest.importorskip("pyarrow")
    kept = write_img2dataset(str(tmp_path), shards=2, per_shard=12, failed=())
    # sizes cycle (96x64, 48x48, 64x128); original_* is twice that
    wide = {k for k, r in kept.items() if r["original_width"] >= 128}
    st = stream(str(tmp_path), batch_size=len(wide), image_size=16, filters=["original_width>=128"])
    got = keys_of(take(st, 1))
    assert sorted(got) == sorted(wide)
    assert st.stats()["filtered"] == len(kept) - len(wide)
    assert "bad/samples_lost" in st.stats() and st.stats()["bad/samples_lost"] == 0
    # string equality, and a filter that removes everything is a clear error
    st = stream(str(tmp_path), batch_size=4, image_size=16, filters=["status==success", "caption!=nothing"])
    assert len(take(st, 2)) == 2
    with pytest.raises(Exception, match="data.filters"):
        take(stream(str(tmp_path), batch_size=4, image_size=16, filters=["original_width>10000"]), 1)
    for bad in ("original_width=>3", "__import__('os')", "width>="):
        with pytest.raises(GentrainError, match="data.filters"):
            stream(str(tmp_path), batch_size=4, filters=[bad])


def test_data_index_equals_a_scan_and_training_reads_it(tmp_path):
    keys = write_uneven(str(tmp_path / "set"))
    os.unlink(tmp_path / "set" / "index.json")
    scanned = resolve_shards(str(tmp_path / "set" / "{000000..000006}.tar"))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "gentrain", "data", "index", str(tmp_path / "set"), "--processes", "2",
                          "--image-sizes"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "set" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == list(scanned.counts)
    assert index["image_sizes"] == {"8x8": len(keys)}
    indexed = resolve_shards(str(tmp_path / "set"))
    assert indexed.counts == scanned.counts and indexed.scanned == 0
    assert indexed.fingerprint() == scanned.fingerprint()
    # a second run refuses to overwrite
    again = subprocess.run([sys.executable, "-m", "gentrain", "data", "index", str(tmp_path / "set")],
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_jpeg_draft_decode_is_the_same_size_and_close(tmp_path):
    raw = {"__key__": "k", "jpg": jpeg(768, 576, 3), "txt": b"x"}
    full = decode_sample(raw, DecodeOptions(image_size=256, jpeg_draft=False))["image"].astype(np.float64)
    draft = decode_sample(raw, DecodeOptions(image_size=256, jpeg_draft=True))["image"].astype(np.float64)
    assert draft.shape == full.shape == (256, 256, 3)
    err = np.abs(draft - full).mean()
    assert err < 1.0, err        # mean |diff| of 255: measured 0.08 (max 13)
    assert err > 0               # the draft path did run (DCT-scaled decode differs a little)
    # a PNG has no draft mode: identical either way
    buf = io.BytesIO()
    Image.open(io.BytesIO(raw["jpg"])).save(buf, format="PNG")
    raw_png = {"__key__": "k", "png": buf.getvalue(), "txt": b"x"}
    a = decode_sample(raw_png, DecodeOptions(image_size=64, jpeg_draft=True))["image"]
    b = decode_sample(raw_png, DecodeOptions(image_size=64, jpeg_draft=False))["image"]
    assert np.array_equal(a, b)
