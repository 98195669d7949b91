"""One reader lane: raw samples of its episodes -> seeded shuffle -> decode -> batches.

A lane's position is ``{"episode", "offset", "events", "pending"}``: the next post-shuffle raw
sample to read, how many shard-level events (unreadable/truncated shard) of this episode have
already been counted, and the (episode, offset) of decoded samples still waiting in a batch
queue. Each batch carries the position just after it, so the consuming process can save exactly
what it has taken. Resuming replays the raw streams (tar headers and bytes, no decoding) with
the same seeds and decodes only the pending samples and what follows.

A lane state may also carry ``"remap": {"tag", "episodes": {"E": [shard, start, stop, ...]}}``:
explicit segments for episodes E (the rest of an epoch after a change of layout, elastic.py),
read instead of the plan and shuffled with ``tag`` in the seed; it is dropped once the lane has
passed them.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from gentrain.errors import GentrainError
from gentrain.data_pipeline.batches import collate, queue_key
from gentrain.data_pipeline.decode import BadSample, DecodeOptions, FilteredSample, decode_sample
from gentrain.data_pipeline.plan import Segment, epoch_segments, mix_seed, resampled_segments
from gentrain.data_pipeline.storage import open_url
from gentrain.data_pipeline.tario import TruncatedShard, iter_raw_samples

log = logging.getLogger("gentrain.data")

START = {"episode": 0, "offset": 0, "events": 0, "pending": []}


@dataclass(frozen=True)
class LaneSpec:
    """Everything a worker needs to produce a lane's batches (picklable)."""
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    mode: str                 # epoch | resampled
    seed: int
    num_lanes: int            # R * W
    batch_size: int
    shuffle_buffer: int
    decode: DecodeOptions
    policy: str               # skip | fail
    max_bad_fraction: float
    bad_fraction_min_samples: int
    allow_pipe: bool = False
    s3_endpoint_url: Optional[str] = None
    uint8_images: bool = False  # loader workers: ship uint8 (the consumer makes float: decode.join_lane_batches)


class _Event:
    """A shard-level problem, passed through the shuffle buffer in reading order."""
    __slots__ = ("reason", "shard", "detail", "lost")

    def __init__(self, reason: str, shard: str, detail: str, lost: int):
        self.reason, self.shard, self.detail, self.lost = reason, shard, detail, lost


def lane_segments(spec: LaneSpec, lane: int, episode: int, remap: Optional[dict] = None) -> list[Segment]:
    """The segments a lane reads in an episode: the explicit ones of its state's ``remap`` for that
    episode if any (see module doc), else the plan's."""
    explicit = remap["episodes"].get(str(episode)) if remap else None
    if explicit is not None:
        return [Segment(*explicit[i:i + 3]) for i in range(0, len(explicit), 3)]
    if spec.mode == "epoch":
        return epoch_segments(spec.counts, spec.seed, episode, lane, spec.num_lanes)
    return resampled_segments(spec.counts, spec.seed, episode, lane)


def seed_tag(remap: Optional[dict], episode: int) -> tuple:
    """What an explicit (remapped) episode adds to the lane's seeds; nothing for a planned one."""
    return (remap["tag"],) if remap and str(episode) in remap["episodes"] else ()


def buffer_rng(spec: LaneSpec, lane: int, episode: int, remap: Optional[dict] = None) -> random.Random:
    return random.Random(mix_seed("buffer", spec.seed, lane, episode, *seed_tag(remap, episode)))


def episode_raw(spec: LaneSpec, lane: int, episode: int, remap: Optional[dict] = None) -> Iterator[Any]:
    """Raw samples (and _Events) of a lane's episode, in reading order."""
    for seg in lane_segments(spec, lane, episode, remap):
        url, n = spec.urls[seg.shard], 0
        try:
            f = open_url(url, allow_pipe=spec.allow_pipe, s3_endpoint_url=spec.s3_endpoint_url)
        except OSError as e:
            yield _Event("unreadable_shard", url, f"{type(e).__name__}: {e}", seg.stop - seg.start)
            continue
        try:
            for raw in iter_raw_samples(f, url, seg.start, seg.stop):
                n += 1
                yield raw
        except TruncatedShard as e:
            yield _Event("truncated_tar", url, f"after sample {seg.start + n}: {e}", seg.stop - seg.start - n)
        finally:
            f.close()


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer: fill ``size`` samples, then emit a random one per new sample.
    Events pass straight through."""
    buf: list = []
    for it in items:
        if isinstance(it, _Event):
            yield it
        elif len(buf) < size:
            buf.append(it)
        else:
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = it
    rng.shuffle(buf)
    yield from buf


class _Bad:
    """Bad-sample bookkeeping of a lane: counts since the last batch, and the fraction check."""

    def __init__(self, spec: LaneSpec):
        self.spec, self.delta, self.lost = spec, Counter(), 0
        self.total_lost = self.total_good = 0
        self.filtered = 0      # good samples that data.filters left out, since the last batch

    def record(self, reason: str, shard: str, key: Optional[str], detail: str, lost: int) -> Optional[str]:
        """Count one bad sample/shard; returns an error message when reading must stop."""
        where = f"shard {shard}" + (f", key {key}" if key else "")
        if self.spec.policy == "fail":
            return f"bad sample ({reason}) in {where}: {detail} (data.bad_sample_policy=fail)"
        self.delta[reason] += 1
        self.lost += lost
        self.total_lost += lost
        log.warning("skipping bad data (%s) in %s: %s", reason, where, detail)
        seen = self.total_lost + self.total_good
        if self.total_lost > self.spec.max_bad_fraction * max(seen, self.spec.bad_fraction_min_samples):
            return (f"too much bad data: {self.total_lost} of {seen} samples lost, over data.max_bad_fraction="
                    f"{self.spec.max_bad_fraction}; last: {reason} in {where}: {detail}")
        return None

    def take(self) -> tuple[dict, int, int]:
        out = (dict(self.delta), self.lost, self.filtered)
        self.delta, self.lost, self.filtered = Counter(), 0, 0
        return out


def lane_batches(spec: LaneSpec, lane: int, state: dict) -> Iterator[dict]:
    """Endless batches of lane ``lane`` starting at ``state`` (see module doc). Each batch has
    ``__meta__ = {"lane", "state", "bad", "lost", "filtered"}``; a fatal problem yields ``{"__error__": msg}``."""
    e0, o0, ev0 = int(state["episode"]), int(state["offset"]), int(state["events"])
    pending = {(int(e), int(o)) for e, o in state["pending"]}
    remap = state.get("remap")
    last_explicit = max(map(int, remap["episodes"]), default=-1) if remap else -1
    queues: dict[tuple, list] = {}
    bad = _Bad(spec)
    randomize = spec.decode.random_crop or spec.decode.random_flip
    episode = min([e for e, _ in pending] + [e0])
    while True:
        replay = episode < e0  # only pending samples of this episode are wanted
        last_wanted = max([o for e, o in pending if e == episode], default=-1)
        if replay and last_wanted < 0:
            episode += 1
            continue
        offset = events = good = fresh = filtered = 0
        rng = buffer_rng(spec, lane, episode, remap)
        tag = seed_tag(remap, episode)
        for item in shuffled(episode_raw(spec, lane, episode, remap), spec.shuffle_buffer, rng):
            if isinstance(item, _Event):
                events += 1
                if replay or (episode == e0 and events <= ev0):
                    continue  # counted before the position was saved
                fresh += 1
                err = bad.record(item.reason, item.shard, None, item.detail, item.lost)
                if err:
                    yield {"__error__": err}
                    return
                continue
            pos = (episode, offset)
            offset += 1
            if replay or (episode == e0 and pos[1] < o0):
                if pos not in pending:
                    if replay and offset > last_wanted:
                        break
                    continue  # consumed before the save: dropped without decoding
                pending.discard(pos)
            else:
                fresh += 1
            aug = random.Random(mix_seed("aug", spec.seed, lane, *pos, *tag)) if randomize else None
            try:
                sample = decode_sample(item, spec.decode, aug)
            except FilteredSample:   # only fresh samples get here: pending ones were decoded fine
                bad.filtered += 1
                filtered += 1
                continue
            except BadSample as b:
                err = bad.record(b.reason, item["__shard__"], item["__key__"], b.detail, 1)
                if err:
                    yield {"__error__": err}
                    return
                continue
            good += 1
            bad.total_good += 1
            if spec.mode == "epoch":
                sample["epoch"] = episode
            q = queues.setdefault(queue_key(sample), [])
            q.append((sample, pos))
            if len(q) == spec.batch_size:
                batch = collate([s for s, _ in q], uint8_images=spec.uint8_images)
                q.clear()
                delta, lost, nfiltered = bad.take()
                waiting = [list(p) for qq in queues.values() for _, p in qq]
                after = {"episode": episode, "offset": offset, "events": events, "pending": waiting}
                if last_explicit >= min([e for e, _ in waiting] + [episode]):
                    after["remap"] = remap  # still needed to resume; shared, never modified
                batch["__meta__"] = {"lane": lane, "bad": delta, "lost": lost, "filtered": nfiltered, "state": after}
                yield batch
            if replay and offset > last_wanted:
                break
        if fresh > 0 and good == 0:
            why = f"{filtered} of them failed data.filters" if filtered else "every sample it planned was bad or unreadable"
            yield {"__error__": f"lane {lane} read no usable sample in {spec.mode} episode {episode}: {why}"}
            return
        episode += 1


def check_policy(policy: str) -> None:
    if policy not in ("skip", "fail"):
        raise GentrainError(f"data.bad_sample_policy={policy!r}: choose skip or fail")
