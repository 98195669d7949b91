"""Which samples each reader lane reads: the exact-epoch plan and the resampled rounds.

A *lane* is one of the W streams of a rank (one per DataLoader worker; 1 without workers); there
are R*W lanes in all, lane ``rank * W + w``. A lane reads *episodes*: in epoch mode episode e is
its share of epoch e, in resampled mode it is a round of randomly drawn shards.

Epoch plan (the same on every rank, from the shard counts and the epoch seed): permute the
shards, lay their samples end to end as one sequence of N, cut it into R*W contiguous ranges of
L = ceil(N / (R*W)) samples; positions past N wrap to the start (at most R*W-1 padding
repeats). A range is a few segments (shard, first sample, end sample): whole shards plus at most
a partial shard at each end.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

RESAMPLED_SHARDS_PER_ROUND = 4


@dataclass(frozen=True)
class Segment:
    shard: int   # index into the shard list
    start: int   # first sample within the shard
    stop: int    # one past the last


def mix_seed(*parts) -> str:
    """A seed for random.Random from named integers (str seeds are hashed with SHA-512, stable
    across processes, unlike hash())."""
    return ":".join(str(p) for p in parts)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(mix_seed("shards", seed, epoch)).shuffle(order)
    return order


def range_length(total: int, num_lanes: int) -> int:
    """L: samples per lane per epoch (equal for all lanes)."""
    return -(-total // num_lanes)


def padding(total: int, num_lanes: int) -> int:
    return range_length(total, num_lanes) * num_lanes - total


def epoch_segments(counts: tuple[int, ...] | list[int], seed: int, epoch: int, lane: int, num_lanes: int) -> list[Segment]:
    """The segments lane ``lane`` of ``num_lanes`` reads in ``epoch``, in order."""
    total = sum(counts)
    if total == 0:
        raise ValueError("the shard set has no samples")
    length = range_length(total, num_lanes)
    order = shard_order(len(counts), seed, epoch)
    offsets, acc = [], 0  # where each shard of the permuted sequence starts
    for s in order:
        offsets.append(acc)
        acc += counts[s]
    segments: list[Segment] = []
    pos, end = lane * length, (lane + 1) * length
    while pos < end:
        g = pos % total  # wrap: the padding repeats the sequence's first samples
        # the permuted shard holding global position g
        k = bisect.bisect_right(offsets, g) - 1
        first = g - offsets[k]
        take = min(counts[order[k]] - first, end - pos, total - g)
        segments.append(Segment(order[k], first, first + take))
        pos += take
    return segments


def resampled_segments(counts: tuple[int, ...] | list[int], seed: int, round_: int, lane: int) -> list[Segment]:
    """A round of a resampled lane: whole shards drawn with replacement, from (seed, lane, round)."""
    rng = random.Random(mix_seed("resampled", seed, lane, round_))
    nonempty = [i for i, c in enumerate(counts) if c > 0]
    picks = [rng.choice(nonempty) for _ in range(RESAMPLED_SHARDS_PER_ROUND)]
    return [Segment(s, 0, counts[s]) for s in picks]
