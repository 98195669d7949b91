"""Bad samples under both policies: skip (count, go on, stop past a fraction) and fail."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from data_helpers.shards import keys_of, png, sample, stream, take
from gentrain.data_pipeline.writer import ShardSetWriter
from gentrain.errors import DataError

N_SHARDS, PER_SHARD = 3, 10
BAD_KEY, BAD_SHARD = "s1_03", "000001.tar"


def _build(d: str, kind: str) -> int:
    """3 shards of 10 with one defect of ``kind`` in shard 1; returns the samples it loses."""
    w = ShardSetWriter(d, max_samples=PER_SHARD, check_images=False)
    for s in range(N_SHARDS):
        for i in range(PER_SHARD):
            key = f"s{s}_{i:02d}"
            smp = sample(key, s * PER_SHARD + i)
            if key == BAD_KEY:
                if kind == "corrupt_image":
                    smp["png"] = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
                elif kind == "missing_caption":
                    del smp["txt"]
                elif kind == "oversized_image":
                    smp["png"] = png(np.zeros((40, 40, 3), np.uint8))  # 1600 px > 1000 allowed below
            w.write(smp)
    w.close()
    path = os.path.join(d, BAD_SHARD)
    if kind == "truncated_tar":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        return 5 + 1  # roughly half the shard; computed exactly below from what is read
    if kind == "unreadable_shard":
        os.unlink(path)
        return PER_SHARD
    return 1


KINDS = ["corrupt_image", "missing_caption", "oversized_image", "truncated_tar", "unreadable_shard"]


@pytest.mark.parametrize("kind", KINDS)
def test_skip_counts_and_goes_on(tmp_path, kind):
    _build(str(tmp_path), kind)
    st = stream(str(tmp_path), batch_size=1, max_image_pixels=1000, max_bad_fraction=0.5, shuffle_buffer=4)
    batches = take(st, 60)
    epochs = torch.cat([b["epoch"] for b in batches]).tolist()
    ep0 = Counter(k for k, e in zip(keys_of(batches), epochs) if e == 0)
    all_keys = {f"s{s}_{i:02d}" for s in range(N_SHARDS) for i in range(PER_SHARD)}
    stats = st.stats()
    # once per epoch: two epochs read in full, the third started (its event may be read already)
    assert max(epochs) == 2 and stats[f"bad/{kind}"] in (2, 3)
    lost = (N_SHARDS * PER_SHARD - len(ep0))
    assert stats["bad/samples_lost"] == stats[f"bad/{kind}"] * lost
    assert all(v == 1 for v in ep0.values())
    if kind == "unreadable_shard":
        assert set(ep0) == {k for k in all_keys if not k.startswith("s1_")}
    elif kind == "truncated_tar":
        missing = all_keys - set(ep0)
        assert missing and all(k.startswith("s1_") for k in missing)
        assert 0 < len(missing) < PER_SHARD
    else:
        assert set(ep0) == all_keys - {BAD_KEY}
    # the position carries the counts; a resumed stream neither recounts nor forgets bad data
    kw = dict(batch_size=1, max_image_pixels=1000, max_bad_fraction=0.5, shuffle_buffer=4)
    for head in (7, 40):
        first, straight = stream(str(tmp_path), **kw), stream(str(tmp_path), **kw)
        take(first, head)
        again = stream(str(tmp_path), **kw)
        again.load_state_dict(first.state_dict())
        assert keys_of(take(again, 60 - head)) == keys_of(take(straight, 60))[head:]
        assert again.stats() == straight.stats()


@pytest.mark.parametrize("kind", KINDS)
def test_fail_stops_at_the_first_naming_shard_and_key(tmp_path, kind):
    _build(str(tmp_path), kind)
    st = stream(str(tmp_path), batch_size=1, max_image_pixels=1000, bad_sample_policy="fail", shuffle_buffer=4)
    with pytest.raises(DataError) as e:
        take(st, 60)
    msg = str(e.value)
    assert kind in msg and BAD_SHARD in msg and "\n" not in msg
    if kind not in ("truncated_tar", "unreadable_shard"):
        assert BAD_KEY in msg


def test_skip_stops_once_too_much_is_bad(tmp_path):
    _build(str(tmp_path), "unreadable_shard")  # a third of the data
    st = stream(str(tmp_path), batch_size=1, max_bad_fraction=0.1, bad_fraction_min_samples=10)
    with pytest.raises(DataError, match="too much bad data"):
        take(st, 30)


def test_skip_tolerates_a_small_fraction(tmp_path):
    _build(str(tmp_path), "corrupt_image")  # 1 in 30, under 5%
    st = stream(str(tmp_path), batch_size=1, max_bad_fraction=0.05, bad_fraction_min_samples=10)
    take(st, 60)
    assert st.stats()["bad/corrupt_image"] == 2
