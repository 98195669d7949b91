"""Elastic resume of the data position: a position saved by N ranks x W lanes continues on
M x W' lanes, reading the rest of the epoch exactly once (plus the stated padding), in process."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from data_helpers.shards import UNEVEN, keys_of, stream, take, write_uneven
from gentrain.data_pipeline.elastic import remap_positions, replay_positions
from gentrain.data_pipeline.lanes import lane_segments
from gentrain.data_pipeline.plan import padding, range_length
from gentrain.errors import GentrainError

KW = dict(batch_size=4, shuffle_buffer=8)  # 81 samples in 7 uneven shards


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("uneven"))
    return d, write_uneven(d)


def read(streams, n_batches):
    """Take n batches from each stream (the ranks in lock step); (key, epoch) pairs of all ranks."""
    got = []
    for st, n in zip(streams, n_batches if isinstance(n_batches, list) else [n_batches] * len(streams)):
        for b in take(st, n):
            got += list(zip(b["key"], b["epoch"].tolist() if "epoch" in b else [-1] * len(b["key"])))
    return got


def saved_states(streams):
    return [json.loads(json.dumps(st.state_dict())) for st in streams]


def remapped(d, saved, world, workers, **kw):
    out = []
    for r in range(world):
        st = stream(d, rank=r, world_size=world, num_workers=workers, **{**KW, **kw})
        st.load_state_dict(json.loads(json.dumps(st.remapped_state(saved))))
        out.append(st)
    return out


def explicit_length(flat):
    """Samples in a lane's explicit segments [shard, start, stop, ...]."""
    return sum(flat[2::3]) - sum(flat[1::3])


def batches_to_finish(st, last_epoch):
    """Batches a (non-bucket) rank takes until each of its lanes has read epoch ``last_epoch``."""
    per_lane = range_length(st.shards.total, st.num_lanes)
    need = 0
    for ls in st.lane_states:
        explicit = (ls.get("remap") or {}).get("episodes", {})
        n = sum(explicit_length(explicit[str(e)]) if str(e) in explicit else per_lane
                for e in range(ls["episode"], last_epoch + 1)) - ls["offset"]
        need = max(need, n)
    return st.lanes * -(-need // st.batch_size)


def check_epochs(keys, before, after, info, num_lanes, epochs, old_lanes=None):
    """Each epoch is read in full; repeats: old ones before the save + the remap's (or the plan's)."""
    for e in epochs:
        b = [k for k, x in before if x == e]
        a = [k for k, x in after if x == e]
        seen = Counter(b + a)
        assert set(seen) == set(keys), f"epoch {e}: missing {sorted(set(keys) - set(seen))}"
        repeats = sum(seen.values()) - len(keys)
        if str(e) in info:
            added = info[str(e)]["padding"]
            assert added <= num_lanes - 1
            assert repeats == len(b) - len(set(b)) + added, e
        elif b:  # read in full before the save
            assert not a and repeats == padding(len(keys), old_lanes), e
        else:
            assert repeats == padding(len(keys), num_lanes), e


@pytest.mark.parametrize("old,new,k", [((2, 0), (1, 0), 6), ((2, 0), (1, 0), 11), ((1, 0), (2, 0), 9),
                                        ((1, 2), (1, 0), 21), ((2, 0), (3, 0), 4), ((2, 0), (1, 2), 6)])
def test_remap_reads_the_rest_of_the_epoch_exactly_once(uneven, old, new, k):
    d, keys = uneven
    (n, w), (m, w2) = old, new
    first = [stream(d, rank=r, world_size=n, num_workers=w, **KW) for r in range(n)]
    before = read(first, k)
    saved = saved_states(first)
    if old == (1, 2):  # 2 workers -> none; a rank's lanes advance in step (each batch takes B/W from each)
        assert sorted(ls["episode"] for ls in saved[0]["lane_states"]) == [1, 1]
    second = remapped(d, saved, m, w2)
    st0 = second[0].state_dict()
    info = second[0].remapped_state(saved)["remapped"]["epochs"]
    last = max(int(e) for e in info) + 1  # the remapped epochs, then one in the new layout's plan
    after = read(second, [batches_to_finish(st, last) for st in second])
    check_epochs(keys, before, after, info, m * max(1, w2), range(0, last + 1), n * max(1, w))
    # ranks stay in step: every new lane has as many samples of each remapped epoch
    sizes = {tuple(explicit_length(ls["remap"]["episodes"][e]) for e in sorted(info))
             for st in second for ls in st.remapped_state(saved)["lane_states"]}
    assert len(sizes) == 1 and len(st0["lane_states"]) == max(1, w2)
    # counters: the consumed samples are shared out over the new ranks, their sum kept
    assert sum(st.remapped_state(saved)["consumed_samples"] for st in second) == n * k * 4


def remap_lanes(state):
    return [ls for ls in state["lane_states"] if "remap" in ls]


def test_resume_after_remap_is_bitwise_the_uninterrupted_run(uneven):
    d, keys = uneven
    first = [stream(d, rank=r, world_size=2, **KW) for r in range(2)]
    before = read(first, 7)
    saved = saved_states(first)
    straight = take(remapped(d, saved, 1, 0)[0], 30)
    cut = remapped(d, saved, 1, 0)[0]
    head = take(cut, 4)  # mid-remainder
    again = stream(d, **KW)
    again.load_state_dict(json.loads(json.dumps(cut.state_dict())))
    assert remap_lanes(again.state_dict())  # the explicit segments travel in the saved state
    rest = take(again, 26)
    assert keys_of(head + rest) == keys_of(straight)
    assert torch.equal(torch.cat([b["image"] for b in head + rest]), torch.cat([b["image"] for b in straight]))
    # past the remainder the normal plan of the new layout: the explicit segments are dropped
    assert not remap_lanes(again.state_dict()) and again.state_dict()["lane_states"][0]["episode"] >= 1
    # a 2 -> 1 -> 2 chain (remapped again mid-remainder) still reads epoch 0 exactly once
    cut = remapped(d, saved, 1, 0)[0]
    middle = read([cut], 4)
    third = remapped(d, saved_states([cut]), 2, 0)
    info = third[0].remapped_state(saved_states([cut]))["remapped"]["epochs"]
    after = read(third, [batches_to_finish(st, 1) for st in third])
    b = before + middle
    check_epochs(keys, b, after, info, 2, [0])


def test_remap_with_aspect_buckets_keeps_pending_samples(tmp_path):
    import numpy as np

    from data_helpers.shards import png
    from gentrain.data_pipeline.writer import ShardSetWriter

    shapes = [(16, 16), (32, 16), (16, 32)]
    w = ShardSetWriter(str(tmp_path), max_samples=9, source="test")
    keys = []
    for i, n in enumerate((9, 7, 9, 5)):
        for j in range(n):
            keys.append(f"b{i}_{j}")
            sw, sh = shapes[(i + j) % 3]
            w.write({"__key__": keys[-1], "png": png(np.full((sh, sw, 3), j, np.uint8)), "txt": "x"})
        w.end_shard()
    w.close()
    kw = dict(batch_size=3, shuffle_buffer=4, aspect_buckets=True)
    d = str(tmp_path)
    first = [stream(d, rank=r, world_size=2, **kw) for r in range(2)]
    before = read(first, 6)
    saved = saved_states(first)
    # the case this checks: samples of epoch 0 still waiting in a bucket while the lane reads epoch 1
    assert any(e < ls["episode"] for s in saved for ls in s["lane_states"] for e, _ in ls["pending"])
    second = remapped(d, saved, 1, 0, **kw)[0]
    after = read([second], 40)
    info = second.remapped_state(saved)["remapped"]["epochs"]
    for e in (0, 1):
        seen = Counter([k for k, x in before + after if x == e])
        assert set(seen) == set(keys)
        b = [k for k, x in before if x == e]
        assert sum(seen.values()) - len(keys) == len(b) - len(set(b)) + info[str(e)]["padding"]


def test_remap_after_an_unreadable_shard_replays_its_headers(tmp_path):
    d = str(tmp_path)
    keys = write_uneven(d)
    os.unlink(os.path.join(d, "000002.tar"))  # 11 samples lost once per epoch, counted by the lane that plans them
    kw = dict(max_bad_fraction=0.5)
    first = [stream(d, rank=r, world_size=2, **KW, **kw) for r in range(2)]
    before = read(first, 6)
    saved = saved_states(first)
    assert any(ls["events"] for s in saved for ls in s["lane_states"])  # the header replay is used
    second = remapped(d, saved, 1, 0, **kw)[0]
    state = second.remapped_state(saved)
    # the lost shard is not planned again: the remainder is what was neither read nor lost
    rest = state["lane_states"][0]["remap"]["episodes"]["0"]
    assert 2 not in rest[0::3]
    assert state["remapped"]["epochs"]["0"]["remaining"] == 81 - 11 - len({k for k, x in before if x == 0})
    assert state["bad"] == {"unreadable_shard": sum(sum(s["bad"].values()) for s in saved)}
    after = read([second], 12)
    ep0 = Counter(k for k, x in before + after if x == 0)
    assert set(ep0) == {k for k in keys if not k.startswith("s2_")}


def test_header_replay_agrees_with_the_plan(uneven):
    d, _ = uneven
    spec = stream(d, world_size=2, **KW).spec
    base = [sum(UNEVEN[:i]) for i in range(len(UNEVEN))]
    for lane in range(2):
        n = sum(s.stop - s.start for s in lane_segments(spec, lane, 1))
        a, lost_a = replay_positions(spec, lane, 1, None, base, n, headers=False)
        b, lost_b = replay_positions(spec, lane, 1, None, base, n, headers=True)
        assert a.tolist() == b.tolist() and lost_a == lost_b == []
    # and they name the samples the lane really reads, in its order
    st = stream(d, world_size=2, **KW)
    got = keys_of(take(st, 5))
    ids, _ = replay_positions(st.spec, 0, 0, None, base, 20, headers=False)
    names = [f"s{s}_{g - base[s]:02d}" for g in ids.tolist() for s in [max(i for i in range(7) if base[i] <= g)]]
    assert names == got


def test_resampled_remap_starts_fresh_rounds_and_resumes(uneven):
    d, _ = uneven
    kw = dict(mode="resampled")
    first = [stream(d, rank=r, world_size=2, **KW, **kw) for r in range(2)]
    read(first, 9)
    saved = saved_states(first)
    state = remap_positions(saved, 1, 0, 1, spec=stream(d, **KW, **kw).spec)
    old_rounds = [ls["episode"] for s in saved for ls in s["lane_states"]]
    assert state["lane_states"][0]["episode"] == max(old_rounds) + 1
    straight = take(remapped(d, saved, 1, 0, **kw)[0], 12)
    cut = remapped(d, saved, 1, 0, **kw)[0]
    head = take(cut, 5)
    again = stream(d, **KW, **kw)
    again.load_state_dict(cut.state_dict())
    assert keys_of(head + take(again, 7)) == keys_of(straight)


def test_remap_refuses_positions_of_another_run(uneven):
    d, _ = uneven
    first = [stream(d, rank=r, world_size=2, **KW) for r in range(2)]
    read(first, 2)
    saved = saved_states(first)
    spec = stream(d, **KW).spec
    with pytest.raises(GentrainError, match="every rank"):
        remap_positions(saved[:1], 1, 0, 1, spec=spec)
    with pytest.raises(GentrainError, match="seed"):
        remap_positions(saved, 1, 0, 1, spec=stream(d, seed=5, **KW).spec)
    # the same layout: the rank's own saved state, as it is
    assert remap_positions(saved, 2, 1, 1, spec=stream(d, rank=1, world_size=2, **KW).spec) == saved[1]
