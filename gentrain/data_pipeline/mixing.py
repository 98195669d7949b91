"""Weighted mixing of several shard sets (``data.datasets``): stratified batches.

Each dataset d is read by its own exact-epoch shard reader (reader.py: its own lanes, shuffle,
bad-sample accounting, resume and elastic remap), and every batch of B on a rank is b_d samples
of each d, concatenated in dataset order: b_d is d's weight share of B, rounded by largest
remainder to multiples of the lane count (``data.num_workers`` or 1), at least one lane-batch
each. So the proportions hold in every batch (to the rounding: at B=64, weights 0.7/0.3 give
45/19, i.e. 0.703), deterministically, with no draw to replay on resume.

Epochs: each dataset keeps its own exact epochs (every sample once per epoch of that dataset).
A dataset read faster than its size warrants (a high weight on a small set) repeats: it starts
its next epoch sooner, in a new seeded order. One read slower (a low weight on a large set) is
undersampled per unit of training, never truncated: its epoch simply takes longer, and every one
of its samples is still read once before any is read twice. The metrics carry
``data/<name>/consumed_samples``, ``/epoch`` and ``/epoch_progress`` per dataset.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from gentrain.errors import DataError, GentrainError
from gentrain.data_pipeline.batches import concat_batches
from gentrain.data_pipeline.config import DataConfig, dataset_names
from gentrain.data_pipeline.stream import check_position


def batch_shares(batch_size: int, weights: list[float], lanes: int) -> list[int]:
    """Samples of each dataset in a batch: multiples of `lanes` summing to batch_size, each >= lanes,
    by largest remainder of the weight shares (ties to the earlier dataset)."""
    units, n = batch_size // lanes, len(weights)
    if batch_size % lanes or units < n:
        raise GentrainError(f"config key 'train.batch_size': {batch_size} cannot hold one lane-batch of each of the "
                            f"{n} data.datasets ({lanes} sample(s) a lane-batch: data.num_workers); raise the batch size")
    total = sum(weights)
    exact = [units * w / total for w in weights]
    share = [max(1, int(x)) for x in exact]
    while sum(share) > units:       # the at-least-one floor overshot: take from the most over its share
        share[max((i for i in range(n) if share[i] > 1), key=lambda i: share[i] - exact[i])] -= 1
    for i in sorted(range(n), key=lambda i: (-(exact[i] - share[i]), i))[:units - sum(share)]:
        share[i] += 1
    return [s * lanes for s in share]


class MixedStream:
    """Batches of this rank drawn from every dataset's reader in fixed shares (module doc)."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 uint8_images: bool = False):
        from gentrain.data_pipeline.reader import make_shard_stream

        self.cfg, self.names = cfg, dataset_names(cfg)
        self.shares = batch_shares(batch_size, [ds.weight for ds in cfg.datasets], max(1, cfg.num_workers))
        self.streams = []
        for name, ds, b in zip(self.names, cfg.datasets, self.shares):
            one = dataclasses.replace(cfg, shards=ds.shards, datasets=[])
            try:
                self.streams.append(make_shard_stream(one, batch_size=b, rank=rank, world_size=world_size, seed=seed,
                                                     uint8_images=uint8_images))
            except (DataError, GentrainError) as e:
                raise type(e)(f"data.datasets[{name}]: {e}") from None

    @property
    def samples_per_epoch(self) -> int:
        """Every dataset's epoch once (an upper bound on what one pass over the mixture needs)."""
        return sum(s.samples_per_epoch for s in self.streams)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        its = [iter(s) for s in self.streams]
        keys = None
        while True:
            parts = [next(it) for it in its]
            if keys is None:
                keys = [set(p) for p in parts]
                for name, k in zip(self.names[1:], keys[1:]):
                    if k != keys[0]:
                        raise DataError(f"data.datasets: {name} gives samples with {sorted(k)}, {self.names[0]} with "
                                        f"{sorted(keys[0])}; mixed datasets must hold the same members")
            yield concat_batches(parts)

    # -- position ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"kind": "mixed", "names": self.names, "weights": [ds.weight for ds in self.cfg.datasets]}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "shares": self.shares, "datasets": [s.state_dict() for s in self.streams]}

    def _check(self, state: dict[str, Any]) -> None:
        check_position(state, self._identity(), "mixture", "resume with the same data.datasets (names, weights, order)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check(state)
        for s, sub in zip(self.streams, state["datasets"]):
            s.load_state_dict(sub)

    def remapped_state(self, saved: list[dict[str, Any]]) -> dict[str, Any]:
        """Each dataset's position remapped on its own (elastic.py) from every saved rank's."""
        for st in saved:
            self._check(st)
        return {**self._identity(), "shares": self.shares,
                "datasets": [s.remapped_state([st["datasets"][i] for st in saved]) for i, s in enumerate(self.streams)]}

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, s in zip(self.names, self.streams):
            for k, v in s.stats().items():
                if k.startswith("bad/") or k == "filtered":
                    out[k] = out.get(k, 0.0) + v
                if k in ("consumed_samples", "epoch", "epoch_progress", "filtered", "bad/samples_lost"):
                    out[f"{name}/{k}"] = v
        out["consumed_samples"] = float(sum(s.consumed_samples for s in self.streams))
        return out
