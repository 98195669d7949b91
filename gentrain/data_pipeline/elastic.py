"""Elastic resume: continue a data position saved by N ranks x W lanes on M ranks x W' lanes.

Epoch mode keeps the exactly-once promise across the change. From every old rank's saved
position (all ``data_rankR.json`` of the checkpoint), for each epoch e some old lane was still in:

1. replay each old lane's raw stream of e through its shuffle buffer (same segments and seeds as
   lanes.py) to name the sample at each post-shuffle position, as a global id (shard base +
   index within the shard). The replay reads tar headers only (no bytes kept, nothing decoded)
   where the lane counted shard events (unreadable or truncated shards) in e, and only the plan
   (no I/O at all) where it counted none: with no event among the first ``offset`` outputs, no
   event can have reached the buffer before them either, so the plan gives the same order;
2. done = positions < offset that are not pending, plus the samples lost to the shard events the
   lane had already counted; a lane past e is done with its whole range but its pending samples;
3. the remainder (every sample some old lane planned in e, less what any old lane is done with)
   is sorted by (shard in e's shard order, index) into runs of consecutive samples, laid end to
   end and cut into M*W' equal ranges, wrapping to the start: at most M*W'-1 padding repeats per
   remapped epoch, on top of the old padding repeats already read before the save;
4. each new lane reads its range as explicit segments of episode e (``remap`` in its state),
   shuffled with a seed that adds the two layouts and a digest of the old positions; epochs
   after the last remapped one follow the normal plan for M*W' lanes.

An epoch no old lane had read anything of is not remapped (the new layout's plan reads it). The
remapped state is an ordinary position of the new layout: it saves and resumes like any other,
and a second remap (back to N, or on to K) replays the explicit segments like the plan.

Counters: the old ranks' ``consumed_samples``, ``lost`` and ``bad`` counts are summed and shared
out evenly over the new ranks (their sum over ranks is kept exactly); ``consumed_batches`` (the
steps taken, equal on every rank) and ``epoch`` are kept. So after a remap ``epoch_progress``
(``consumed_samples / samples_per_epoch``) is the run's total samples read divided by what all
ranks read per epoch in the new layout: epochs' worth of samples, not an exact epoch boundary.

Resampled mode has no exactly-once promise: the new lanes start fresh rounds numbered past every
old lane's round (so no lane repeats a round's draw); samples pending in the old lanes are dropped.

Assumed unchanged since the save, as for any resume: the shards, seed, data.mode and
data.shuffle_buffer. Every new rank computes the whole remap itself (no communication).
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from dataclasses import replace
from typing import Any, Iterator, Optional

import numpy as np

from gentrain.errors import GentrainError
from gentrain.data_pipeline.lanes import LaneSpec, _Event, buffer_rng, lane_segments, shuffled
from gentrain.data_pipeline.plan import Segment, range_length, shard_order
from gentrain.data_pipeline.shardlist import ShardSet
from gentrain.data_pipeline.storage import open_url
from gentrain.data_pipeline.tario import TruncatedShard, iter_members, sample_key


class _Lost(_Event):
    """A shard event of the replay, with the global ids [first, stop) it lost."""
    __slots__ = ("ids",)

    def __init__(self, url: str, first: int, stop: int):
        super().__init__("replayed", url, "", stop - first)
        self.ids = (first, stop)


def _sample_indices(f, start: int, stop: int) -> Iterator[int]:
    """Indices of the samples [start, stop) of an open tar stream, from its headers only; the same
    samples, and the same TruncatedShard, as ``tario.iter_raw_samples(f, url, start, stop)``."""
    index, cur_key = -1, None
    try:
        for name, _ in iter_members(f, want=lambda name: False):
            key = sample_key(name)[0]
            if key != cur_key:
                if index >= start:
                    yield index  # complete once the next sample's first member shows
                index, cur_key = index + 1, key
                if index >= stop:
                    return
        if index >= start:
            yield index
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TruncatedShard(f"{type(e).__name__}: {e}") from e
    if index + 1 < stop:
        raise TruncatedShard(f"ended after {index + 1} samples, index.json says at least {stop}")


def _raw_ids(spec: LaneSpec, lane: int, episode: int, remap: Optional[dict], base: list[int],
             headers: bool) -> Iterator[Any]:
    """Global ids (and _Lost events) of a lane's raw stream, like ``lanes.episode_raw``."""
    for seg in lane_segments(spec, lane, episode, remap):
        g = base[seg.shard]
        if not headers:
            yield from range(g + seg.start, g + seg.stop)
            continue
        url, n = spec.urls[seg.shard], 0
        try:
            f = open_url(url, allow_pipe=spec.allow_pipe, s3_endpoint_url=spec.s3_endpoint_url)
        except OSError:
            yield _Lost(url, g + seg.start, g + seg.stop)
            continue
        try:
            for _ in _sample_indices(f, seg.start, seg.stop):
                n += 1
                yield g + seg.start + n - 1
        except TruncatedShard:
            yield _Lost(url, g + seg.start + n, g + seg.stop)
        finally:
            f.close()


def replay_positions(spec: LaneSpec, lane: int, episode: int, remap: Optional[dict], base: list[int],
                     upto: int, headers: bool) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The global ids at post-shuffle positions 0..upto-1 of a lane's episode, and the id ranges
    lost to the shard events the lane meets before position upto-1."""
    ids: list[int] = []
    lost: list[tuple[int, int]] = []
    if upto > 0:
        items = shuffled(_raw_ids(spec, lane, episode, remap, base, headers), spec.shuffle_buffer,
                         buffer_rng(spec, lane, episode, remap))
        try:
            for item in items:
                if isinstance(item, _Lost):
                    lost.append(item.ids)
                    continue
                ids.append(item)
                if len(ids) == upto:
                    break
        finally:
            items.close()
    if len(ids) < upto:
        raise GentrainError(f"replaying lane {lane} of episode {episode} found {len(ids)} samples, the saved "
                            f"position is at {upto}: the shards changed since the checkpoint")
    return np.asarray(ids, dtype=np.int64), lost


def _runs(rest: np.ndarray, base: list[int], counts: tuple[int, ...], order: list[int]) -> list[Segment]:
    """The ids marked in ``rest`` as runs of consecutive samples, shards in ``order``."""
    runs = []
    for s in order:
        idx = np.flatnonzero(rest[base[s]:base[s] + counts[s]])
        if not len(idx):
            continue
        cut = np.flatnonzero(np.diff(idx) != 1)
        starts, stops = idx[np.r_[0, cut + 1]], idx[np.r_[cut, len(idx) - 1]] + 1
        runs += [Segment(s, int(a), int(b)) for a, b in zip(starts, stops)]
    return runs


def cut_runs(runs: list[Segment], lane: int, num_lanes: int) -> list[Segment]:
    """Lane ``lane``'s range of the runs laid end to end and cut into ``num_lanes`` equal ranges,
    the last wrapping to the start (at most num_lanes-1 repeats), as in ``plan.epoch_segments``."""
    total = sum(r.stop - r.start for r in runs)
    if total == 0:
        return []
    length = range_length(total, num_lanes)
    offsets, acc = [], 0
    for r in runs:
        offsets.append(acc)
        acc += r.stop - r.start
    out: list[Segment] = []
    pos, end = lane * length, (lane + 1) * length
    while pos < end:
        g = pos % total
        k = int(np.searchsorted(offsets, g, side="right")) - 1
        first = runs[k].start + g - offsets[k]
        take = min(runs[k].stop - first, end - pos, total - g)
        out.append(Segment(runs[k].shard, first, first + take))
        pos += take
    return out


def _first_episode(st: dict) -> int:
    return min([int(e) for e, _ in st["pending"]] + [int(st["episode"])])


def _last_episode(st: dict) -> int:
    return max([int(st["episode"])] + [int(k) for k in (st.get("remap") or {}).get("episodes", {})])


def _mark(mask: np.ndarray, segments: list[Segment], base: list[int]) -> None:
    for seg in segments:
        mask[base[seg.shard] + seg.start:base[seg.shard] + seg.stop] = True


def _remap_epochs(spec: LaneSpec, old: list[tuple[int, dict]], new_lanes: list[int], num_new: int,
                  tag: str) -> tuple[list[dict], dict]:
    """New lane states (for global lanes ``new_lanes`` of ``num_new``) and, per remapped epoch,
    the samples remaining and the padding repeats added (see module doc)."""
    total = sum(spec.counts)
    base = np.r_[0, np.cumsum(spec.counts)[:-1]].tolist()
    e_lo = min(_first_episode(st) for _, st in old)
    e_hi = max(_last_episode(st) for _, st in old)
    explicit: list[dict[str, list[int]]] = [{} for _ in new_lanes]
    info: dict[str, dict[str, int]] = {}
    for e in range(e_lo, e_hi + 1):
        planned, done = np.zeros(total, bool), np.zeros(total, bool)
        for lane, st in old:
            remap, ep = st.get("remap"), int(st["episode"])
            segments = lane_segments(spec, lane, e, remap)
            _mark(planned, segments, base)
            pend = sorted({int(o) for pe, o in st["pending"] if int(pe) == e})
            if e < _first_episode(st) or (e < ep and not pend):
                _mark(done, segments, base)  # read in full before the save
            elif e < ep:  # read but for samples still waiting in a batch queue (aspect buckets)
                ids, _ = replay_positions(spec, lane, e, remap, base, pend[-1] + 1, headers=True)
                mine = np.zeros(total, bool)
                _mark(mine, segments, base)
                mine[ids[pend]] = False
                done |= mine
            elif e == ep:
                offset, events = int(st["offset"]), int(st["events"])
                if pend and pend[-1] >= offset:
                    raise GentrainError(f"saved lane {lane}: pending sample {pend[-1]} at or past its offset {offset}")
                ids, lost = replay_positions(spec, lane, e, remap, base, offset, headers=events > 0)
                if len(lost) != events:
                    raise GentrainError(f"replaying lane {lane} of episode {e} met {len(lost)} shard events before "
                                        f"the saved position, the save counted {events}: the shards changed since "
                                        "the checkpoint")
                keep = np.ones(offset, bool)
                keep[pend] = False
                done[ids[keep]] = True
                for first, stop in lost:
                    done[first:stop] = True
        if not done.any() and planned.all():
            continue  # nothing of epoch e read yet: the new layout's own plan reads it
        runs = _runs(planned & ~done, base, spec.counts, shard_order(len(spec.counts), spec.seed, e))
        remaining = sum(r.stop - r.start for r in runs)
        info[str(e)] = {"remaining": remaining,
                        "padding": range_length(remaining, num_new) * num_new - remaining if remaining else 0}
        for w, lane in enumerate(new_lanes):
            explicit[w][str(e)] = [x for seg in cut_runs(runs, lane, num_new) for x in (seg.shard, seg.start, seg.stop)]
    states = []
    for w in range(len(new_lanes)):
        st: dict[str, Any] = {"episode": e_lo, "offset": 0, "events": 0, "pending": []}
        if explicit[w]:
            st["remap"] = {"tag": tag, "episodes": explicit[w]}
        states.append(st)
    return states, info


def _share(n: int, parts: int, i: int) -> int:
    """Part i of n shared out evenly over ``parts`` (the parts sum to n)."""
    return n // parts + (1 if i < n % parts else 0)


def _checked(saved: list[dict], spec: LaneSpec) -> list[dict]:
    """The saved positions, in rank order, once they are known to be one run's positions of this data."""
    if not saved:
        raise GentrainError("no saved data positions to remap: pass every data_rankR.json of the checkpoint")
    fingerprint = ShardSet(spec.urls, spec.counts).fingerprint()
    want = {"kind": "shards", "mode": spec.mode, "seed": spec.seed, "shards": fingerprint}
    for s in saved:
        diff = {k: (s.get(k), v) for k, v in want.items() if s.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise GentrainError(f"the saved data position of rank {s.get('rank')} does not fit this reader ({what}); "
                                "a position moves to another number of processes or workers only with the same "
                                "shards, data.mode and seed")
    old = sorted(saved, key=lambda s: int(s["rank"]))
    n = len(old)
    if [int(s["rank"]) for s in old] != list(range(n)) or any(int(s["world_size"]) != n for s in old):
        raise GentrainError(f"remapping needs the saved data position of every rank once: got ranks "
                            f"{[s['rank'] for s in old]} of world sizes {sorted({s['world_size'] for s in old})}")
    lanes = {int(s["lanes"]) for s in old}
    if len(lanes) != 1 or any(len(s["lane_states"]) != int(s["lanes"]) for s in old):
        raise GentrainError(f"the saved data positions disagree on the lanes per rank ({sorted(lanes)})")
    return old


def remap_positions(saved: list[dict], new_world_size: int, new_rank: int, new_lanes: int, *,
                    spec: LaneSpec) -> dict[str, Any]:
    """Rank ``new_rank``'s stream state (for ``ShardStream.load_state_dict``) of a layout of
    ``new_world_size`` ranks x ``new_lanes`` lanes, from ``saved``: every old rank's
    ``ShardStream.state_dict()``, any order. ``spec`` is the new stream's (its num_lanes is the
    new total). Unchanged layout: rank ``new_rank``'s saved state as it is. See module doc."""
    old = _checked(saved, spec)
    n, w = len(old), int(old[0]["lanes"])
    if spec.num_lanes != new_world_size * new_lanes:
        raise GentrainError(f"spec.num_lanes={spec.num_lanes}, expected {new_world_size} x {new_lanes}")
    if (n, w) == (new_world_size, new_lanes):
        return copy.deepcopy(old[new_rank])
    lanes = [(r * w + i, st) for r, s in enumerate(old) for i, st in enumerate(s["lane_states"])]
    mine = [new_rank * new_lanes + i for i in range(new_lanes)]
    if spec.mode == "epoch":
        positions = [[lane, st["episode"], st["offset"], st["events"], st["pending"]] for lane, st in lanes]
        digest = hashlib.sha1(json.dumps([n, w, positions]).encode()).hexdigest()[:12]
        tag = f"{n}x{w}>{new_world_size}x{new_lanes}:{digest}"
        states, epochs = _remap_epochs(replace(spec, num_lanes=n * w), lanes, mine, spec.num_lanes, tag)
        how: dict[str, Any] = {"epochs": epochs}
    else:
        fresh = 1 + max(_last_episode(st) for _, st in lanes)
        states = [{"episode": fresh, "offset": 0, "events": 0, "pending": []} for _ in mine]
        how = {"first_round": fresh}
    bad = sum((Counter(s.get("bad", {})) for s in old), Counter())
    return {"kind": "shards", "mode": spec.mode, "seed": spec.seed, "rank": new_rank,
            "world_size": new_world_size, "lanes": new_lanes, "shards": old[0]["shards"],
            "consumed_batches": max(int(s["consumed_batches"]) for s in old),
            "consumed_samples": _share(sum(int(s["consumed_samples"]) for s in old), new_world_size, new_rank),
            "epoch": max(int(s.get("epoch", 0)) for s in old), "lane_states": states,
            "bad": {k: c for k, v in sorted(bad.items()) if (c := _share(v, new_world_size, new_rank))},
            "lost": _share(sum(int(s.get("lost", 0)) for s in old), new_world_size, new_rank),
            "filtered": _share(sum(int(s.get("filtered", 0)) for s in old), new_world_size, new_rank),
            "remapped": {"from": [n, w], "to": [new_world_size, new_lanes], **how}}
