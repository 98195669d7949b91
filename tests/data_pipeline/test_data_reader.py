"""The shard reader in one process: plan, epochs, shuffling, resume, decoding, buckets, URLs."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers.shards import UNEVEN, keys_of, png, sample, stream, take, write_uneven
from gentrain.data_pipeline import lanes as lanes_mod
from gentrain.data_pipeline.batches import collate
from gentrain.data_pipeline.decode import DecodeOptions
from gentrain.data_pipeline.decode import decode_sample as _decode
from gentrain.data_pipeline.transforms import batch_images_to_unit, bucket_shapes, pick_bucket, to_channels


def decode_sample(raw, opts, rng=None):
    """One decoded sample, collated: its image as (C, H, W) in [-1, 1]."""
    out = collate([_decode(raw, opts, rng)])
    return {k: v[0] for k, v in out.items()}
from gentrain.data_pipeline.plan import epoch_segments, padding, range_length
from gentrain.data_pipeline.writer import write_shards
from gentrain.errors import GentrainError


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("uneven"))
    return d, write_uneven(d)


@pytest.mark.parametrize("num_lanes", [1, 2, 3, 4, 6])
def test_plan_covers_every_sample_once_in_equal_ranges(num_lanes):
    for epoch in range(3):
        ranges = [epoch_segments(UNEVEN, 0, epoch, lane, num_lanes) for lane in range(num_lanes)]
        lengths = [sum(s.stop - s.start for s in r) for r in ranges]
        assert lengths == [range_length(sum(UNEVEN), num_lanes)] * num_lanes
        seen = Counter((s.shard, i) for r in ranges for s in r for i in range(s.start, s.stop))
        assert set(seen) == {(sh, i) for sh, n in enumerate(UNEVEN) for i in range(n)}
        assert sum(seen.values()) - len(seen) == padding(sum(UNEVEN), num_lanes) <= num_lanes - 1
        for r in ranges:  # whole shards, plus at most a partial one at each end
            inner = r[1:-1]
            assert all(s.start == 0 and s.stop == UNEVEN[s.shard] for s in inner)


def test_plan_differs_by_epoch_and_seed():
    a = epoch_segments(UNEVEN, 0, 0, 0, 2)
    assert a == epoch_segments(UNEVEN, 0, 0, 0, 2)
    assert a != epoch_segments(UNEVEN, 0, 1, 0, 2)
    assert a != epoch_segments(UNEVEN, 1, 0, 0, 2)


@pytest.mark.parametrize("workers,batch", [(0, 5), (2, 6)])
def test_epoch_reads_every_sample_exactly_once(uneven, workers, batch):
    d, keys = uneven
    st = stream(d, batch_size=batch, num_workers=workers, shuffle_buffer=16)
    per_epoch = st.samples_per_epoch
    assert per_epoch == max(1, workers) * range_length(len(keys), max(1, workers))
    batches = take(st, -(-3 * per_epoch // batch))
    epochs = torch.cat([b["epoch"] for b in batches]).tolist()
    got = keys_of(batches)
    for e in (0, 1):
        ep = [k for k, x in zip(got, epochs) if x == e]
        assert set(ep) == set(keys), f"epoch {e} misses samples"
        extra = Counter(ep) - Counter(keys)  # padding repeats only
        assert sum(extra.values()) == st.padding <= max(1, workers) - 1
    assert [k for k, x in zip(got, epochs) if x == 0] != [k for k, x in zip(got, epochs) if x == 1]
    # pixels and captions belong to their keys (decoded after the shuffle, not mixed up)
    b = batches[0]
    for k, img, txt in zip(b["key"], b["image"], b["txt"]):
        idx = keys.index(k)
        assert txt == f"caption of {k}"
        assert round((img[0, 0, 0].item() + 1) * 127.5) == idx % 256
    # lanes (loader workers) ship uint8, the consuming process makes float32 [-1, 1]: x / 127.5 - 1
    assert b["image"].dtype == torch.float32 and b["image"].is_contiguous()


def test_uint8_lane_batches_become_the_float_images_collate_gives():
    from gentrain.data_pipeline.batches import join_lane_batches
    from gentrain.data_pipeline.transforms import images_to_tensor

    rng = np.random.default_rng(0)
    arrays = [np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)] + \
             [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    samples = [{"key": str(i), "image": a, "label": i} for i, a in enumerate(arrays)]
    parts = [collate(samples[:2], uint8_images=True), collate(samples[2:], uint8_images=True)]
    assert parts[0]["image"].dtype == torch.uint8
    joined = join_lane_batches(parts)
    assert torch.equal(joined["image"], images_to_tensor(arrays))     # bitwise, all 256 values
    assert joined["label"].tolist() == list(range(6)) and joined["key"] == [str(i) for i in range(6)]
    # what the Trainer takes: uint8 joined, made float on its device afterwards, to the same values
    raw = join_lane_batches(parts, uint8_images=True)
    assert raw["image"].dtype == torch.uint8 and raw["label"].tolist() == list(range(6))
    assert torch.equal(batch_images_to_unit(raw)["image"], images_to_tensor(arrays))


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_stream_holds_the_pixels_of_the_float_stream(uneven, workers):
    """``uint8_images=True`` (the Trainer's stream) gives the same samples in the same order, the
    images as uint8 (B, C, H, W), which batch_images_to_unit turns into the float stream's values."""
    d, _ = uneven
    kw = dict(batch_size=4, num_workers=workers, shuffle_buffer=8)
    floats = take(stream(d, **kw), 6)
    raws = take(stream(d, uint8_images=True, **kw), 6)
    for f, r in zip(floats, raws):
        assert r["key"] == f["key"] and r["image"].dtype == torch.uint8 and r["image"].shape == f["image"].shape
        assert torch.equal(batch_images_to_unit(r)["image"], f["image"])


def test_same_seed_same_order_other_seed_other_order(uneven):
    d, _ = uneven
    a = keys_of(take(stream(d, batch_size=8, seed=3), 10))
    assert a == keys_of(take(stream(d, batch_size=8, seed=3), 10))
    assert a != keys_of(take(stream(d, batch_size=8, seed=4), 10))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_continues_with_exactly_the_unseen_samples(uneven, workers, mode):
    d, _ = uneven
    batch = 3 * max(1, workers)  # lane-batches of 3
    kw = dict(batch_size=batch, num_workers=workers, shuffle_buffer=8, mode=mode)
    full = take(stream(d, **kw), 40)
    first = stream(d, **kw)
    head = take(first, 13)  # mid-epoch (81 samples: each lane has read 39 of its 81 or 41)
    state = json.loads(json.dumps(first.state_dict()))
    second = stream(d, **kw)
    second.load_state_dict(state)
    rest = take(second, 27)
    assert keys_of(head) + keys_of(rest) == keys_of(full)
    assert torch.equal(torch.cat([b["image"] for b in head + rest]), torch.cat([b["image"] for b in full]))
    assert second.stats()["consumed_samples"] == 40 * batch


def join_read_ahead_threads(timeout: float = 10.0) -> None:
    import threading

    for t in threading.enumerate():
        if t.name == "gentrain-read-ahead":
            t.join(timeout=timeout)
    assert not [t for t in threading.enumerate() if t.name == "gentrain-read-ahead" and t.is_alive()]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_does_not_decode_consumed_samples(uneven, monkeypatch, prefetch):
    d, _ = uneven
    first = stream(d, batch_size=4, shuffle_buffer=8, prefetch=prefetch)
    it = iter(first)
    consumed = keys_of([next(it) for _ in range(15)])  # 60 samples of epoch 0
    it.close()
    join_read_ahead_threads()  # the first stream's read-ahead must not decode under the patch below
    state = first.state_dict()
    calls = []
    real = lanes_mod.decode_sample
    second = stream(d, batch_size=4, shuffle_buffer=8, prefetch=prefetch)
    second.load_state_dict(state)
    monkeypatch.setattr(lanes_mod, "decode_sample", lambda raw, *a: calls.append(raw["__key__"]) or real(raw, *a))
    it = iter(second)
    nxt = keys_of([next(it)])
    it.close()
    # only the next batch's samples (and with read-ahead, at most `prefetch` + 1 batches more), none consumed
    assert calls[:4] == nxt and len(calls) <= 4 * (1 + (prefetch + 1 if prefetch else 0))
    assert not set(calls) & set(consumed)


def test_position_must_fit_the_reader(uneven):
    d, _ = uneven
    st = stream(d, num_workers=0)
    take(st, 1)
    other = stream(d, num_workers=2)
    with pytest.raises(GentrainError, match="lanes"):
        other.load_state_dict(st.state_dict())


def test_equal_samples_per_epoch_on_every_rank(uneven):
    d, keys = uneven
    for world in (2, 3):
        sizes = {stream(d, rank=r, world_size=world, num_workers=2).samples_per_epoch for r in range(world)}
        assert len(sizes) == 1
        assert sizes.pop() * world - len(keys) == stream(d, world_size=world, num_workers=2).padding < 2 * world


# -- decoding -----------------------------------------------------------------------------------

def _img_bytes(im: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_modes_convert_to_rgb_and_grey():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white
    assert np.array(to_channels(rgba, 3)).min() == 255
    i16 = Image.fromarray(np.array([[0, 32896, 65535]] * 3, np.uint16))
    assert i16.mode.startswith("I")
    assert np.array(to_channels(i16, 1)).tolist() == [[0, 128, 255]] * 3  # scaled, not clipped
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # red
    assert np.array(to_channels(cmyk, 3))[0, 0].tolist() == [255, 0, 0]
    p = Image.new("P", (2, 2))
    p.putpalette([0, 0, 255] * 256)
    assert np.array(to_channels(p, 3))[0, 0].tolist() == [0, 0, 255]
    for im in (rgba, i16, cmyk, p, Image.new("LA", (2, 2)), Image.new("1", (2, 2)), Image.new("F", (2, 2))):
        for c, mode in ((3, "RGB"), (1, "L")):
            assert to_channels(im, c).mode == mode
    # through the full decoder, from stored bytes
    raw = {"__key__": "k", "png": _img_bytes(i16), "txt": b"x"}
    out = decode_sample(raw, DecodeOptions(image_size=3, channels=1))
    assert out["image"].shape == (1, 3, 3) and out["image"].max() == 1.0 and out["image"].min() == -1.0
    raw = {"__key__": "k", "jpg": _img_bytes(Image.new("CMYK", (8, 8)), "JPEG"), "txt": b"x"}
    assert decode_sample(raw, DecodeOptions(image_size=4))["image"].shape == (3, 4, 4)


def test_resize_crop_flip():
    a = np.zeros((8, 16), np.uint8)
    a[:, 8:] = 255  # left half black, right half white
    raw = {"__key__": "k", "png": png(a), "txt": b"x"}
    centre = decode_sample(raw, DecodeOptions(image_size=8, channels=1))["image"][0]
    assert centre.shape == (8, 8) and centre[:, 0].max() == -1 and centre[:, -1].min() == 1
    flipped = decode_sample(raw, DecodeOptions(image_size=8, channels=1, random_flip=True),
                            rng=_FixedRng(0.0))["image"][0]
    assert torch.equal(flipped, centre.flip(-1))
    left = decode_sample(raw, DecodeOptions(image_size=8, channels=1, random_crop=True), rng=_FixedRng(0.9, 0))
    assert left["image"].max() == -1  # crop at x=0: all black


class _FixedRng:
    def __init__(self, r, offset=0):
        self.r, self.offset = r, offset

    def random(self):
        return self.r

    def randint(self, a, b):
        return self.offset


def test_unsafe_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = pickle.dumps(Boom())
    good = sample("k0", 0)
    write_shards([{**good, "pyd": evil, "pickle": evil, "pth": evil}], str(tmp_path / "s"))
    b = take(stream(str(tmp_path / "s"), batch_size=1), 1)[0]
    assert b["key"] == ["k0"] and not marker.exists()
    assert not ({"pyd", "pickle", "pth"} & set(b))
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(Exception, match="pickle|bad_array|Object arrays"):
        decode_sample({"__key__": "k", "latent.npy": obj.getvalue(), "txt": b"x"}, DecodeOptions())


def test_cached_shards_pass_arrays_through(tmp_path):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    samples = [{"__key__": f"c{i}", "latent.npy": npy(np.full((4, 2, 2), i, np.float16)),
                "emb.npy": npy(np.zeros((5, 3), np.float32)), "mask.npy": npy(np.ones(5, bool)),
                "txt": f"cap {i}"} for i in range(6)]
    write_shards(samples, str(tmp_path))
    b = take(stream(str(tmp_path), batch_size=3, shuffle_buffer=1), 1)[0]
    assert b["latent"].shape == (3, 4, 2, 2) and b["latent"].dtype == torch.float16
    assert b["emb"].shape == (3, 5, 3) and b["mask"].dtype == torch.bool
    assert "image" not in b


def test_aspect_buckets_give_equal_shapes_and_keep_exact_epochs(tmp_path):
    buckets = bucket_shapes(32)
    assert (32, 32) in buckets and len(buckets) == 7
    assert pick_bucket(64, 32, buckets)[1] > pick_bucket(64, 32, buckets)[0]  # wide image, wide bucket
    shapes = [(16, 16), (32, 16), (16, 32), (40, 20)]  # (W, H)
    samples = [{"__key__": f"b{i}", "png": png(np.full((shapes[i % 4][1], shapes[i % 4][0], 3), i, np.uint8)),
                "txt": "x"} for i in range(30)]
    write_shards(samples, str(tmp_path), max_samples=7)
    kw = dict(batch_size=4, aspect_buckets=True, shuffle_buffer=8)
    batches = take(stream(str(tmp_path), **kw), 30)
    assert len({tuple(b["image"].shape[2:]) for b in batches}) == 3  # square, wide, tall
    for b in batches:
        for img, k in zip(b["image"], b["key"]):
            w, h = shapes[int(k[1:]) % 4]
            assert tuple(img.shape[1:]) == pick_bucket(w, h, buckets)
    epochs = torch.cat([b["epoch"] for b in batches]).tolist()
    got = keys_of(batches)
    assert Counter(k for k, e in zip(got, epochs) if e == 0) == Counter(s["__key__"] for s in samples)
    # resume in bucket mode: pending samples of partly filled buckets come back, in order
    first = stream(str(tmp_path), **kw)
    take(first, 11)
    second = stream(str(tmp_path), **kw)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert first.state_dict()["lane_states"][0]["pending"]  # the case this checks
    assert keys_of(take(second, 19)) == keys_of(batches[11:])


# -- URLs -----------------------------------------------------------------------------------------

def test_patterns_lists_and_directories_agree(uneven):
    d, keys = uneven
    pattern = os.path.join(d, "{000000..000006}.tar")
    listed = ",".join(os.path.join(d, f"{i:06d}.tar") for i in range(7))
    ref = keys_of(take(stream(d, batch_size=9), 9))
    assert sorted(ref) == sorted(keys)
    assert keys_of(take(stream(pattern, batch_size=9), 9)) == ref
    assert keys_of(take(stream(listed, batch_size=9), 9)) == ref


def test_shards_without_index_are_counted(tmp_path):
    write_shards([sample(f"k{i}", i) for i in range(9)], str(tmp_path), max_samples=4)
    os.unlink(tmp_path / "index.json")
    got = keys_of(take(stream(str(tmp_path / "{000000..000002}.tar"), batch_size=9), 1))
    assert sorted(got) == [f"k{i}" for i in range(9)]


def test_pipe_urls_need_opt_in(uneven):
    d, keys = uneven
    url = ",".join(f"pipe:cat {os.path.join(d, f'{i:06d}.tar')}" for i in range(7))
    with pytest.raises(GentrainError, match="allow_pipe"):
        stream(url)
    got = keys_of(take(stream(url, batch_size=81, allow_pipe=True), 1))
    assert sorted(got) == sorted(keys)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_reads_long_names_in_every_format(tmp_path, fmt):
    from gentrain.data_pipeline.tario import iter_raw_samples

    deep = "d" * 120 + "/" + "é" * 3 + "x" * 90  # > 100 bytes: prefix field, GNU longname or PAX path
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)  # a non-file member is stepped over
        for key, ext, data in [("a", "txt", b"one"), ("a", "png", b"\x00" * 1000), (deep, "txt", b"two"),
                               ("c", "json", b"{}")]:
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with open(path, "rb") as f:
        got = list(iter_raw_samples(f, "s.tar"))
    assert [g["__key__"] for g in got] == ["a", deep, "c"]
    assert got[0]["txt"] == b"one" and len(got[0]["png"]) == 1000 and got[1]["txt"] == b"two"
    with open(path, "rb") as f:
        assert [g["__key__"] for g in iter_raw_samples(f, "s.tar", 1, 2)] == [deep]


def test_read_ahead_keeps_order_raises_errors_and_stops_when_closed():
    from gentrain.data_pipeline.reader import read_ahead

    assert list(read_ahead(iter(range(50)), 3)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("shard x.tar: boom")
    it = read_ahead(broken(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    it = read_ahead(iter(range(10**9)), 2)
    next(it)
    it.close()
    join_read_ahead_threads()
