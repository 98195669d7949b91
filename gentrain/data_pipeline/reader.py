"""The WebDataset shard reader: a resumable :class:`BatchStream` over tar shards.

Each rank runs W lanes (one per DataLoader worker, 1 without workers) that build their batches
themselves (see lanes.py), of B/W samples each; the DataLoader hands them out round-robin over
workers, in order, and a rank's batch of B is one lane-batch from each of its W lanes, in lane
order. So the global batch of a step is the concatenation over all R*W lanes (lane r*W + w at
rows (r*W + w) * B/W): it depends only on R*W and the global batch size, and 1 process with 2
workers at batch 2B reads what 2 processes with 1 worker at batch B read together. Aspect
buckets are the exception: lanes fill their buckets independently, so there a batch is one whole
lane-batch of B (batch j from lane j mod W), which is not layout-invariant.

The stream's position is counted here, on the consuming side: the batches taken and, per lane,
the position just after the last lane-batch taken from it. Streams are endless (epochs follow one
another; a batch may straddle two epochs), and in epoch mode every rank reads exactly W*L samples
per epoch, so ranks never wait on one another.

Do not pass the DataLoader through ``accelerator.prepare``: it is already split per rank.
"""
from __future__ import annotations

import copy
import queue
import threading
from collections import Counter
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gentrain.errors import DataError, GentrainError
from gentrain.data_pipeline.batches import join_lane_batches
from gentrain.data_pipeline.config import DataConfig, batch_split_error
from gentrain.data_pipeline.decode import DecodeOptions, parse_filters
from gentrain.data_pipeline.elastic import remap_positions
from gentrain.data_pipeline.lanes import START, LaneSpec, check_policy, lane_batches
from gentrain.data_pipeline.plan import padding, range_length
from gentrain.data_pipeline.conversion import report_conversion
from gentrain.data_pipeline.shardlist import ShardSet, resolve_shards
from gentrain.data_pipeline.stream import check_position

MODES = ("epoch", "resampled")


class _LaneDataset(IterableDataset):
    """Worker w plays local lane (rotation + w) mod W, so that the DataLoader's first batch comes
    from the lane whose turn it is after a resume (always lane 0 unless aspect buckets are on)."""

    def __init__(self, spec: LaneSpec, rank: int, lanes: int, states: list[dict], rotation: int):
        self.spec, self.rank, self.lanes, self.states, self.rotation = spec, rank, lanes, states, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = info.id if info else 0
        if info is not None:
            torch.set_num_threads(1)  # W workers on a few cores: no thread oversubscription
            if info.num_workers != self.lanes:
                raise RuntimeError(f"expected {self.lanes} workers, got {info.num_workers}")
        local = (self.rotation + w) % self.lanes
        return lane_batches(self.spec, self.rank * self.lanes + local, self.states[local])


def read_ahead(source: Iterator[dict], depth: int) -> Iterator[dict]:
    """Items of `source`, produced up to `depth` ahead by a daemon thread, in order; an exception
    in the thread is raised here; closing this generator stops the thread. The lanes carry their
    state in each item, so what was read ahead but not consumed is not lost on a checkpoint."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(done)
        except BaseException as e:   # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, name="gentrain-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class ShardStream:
    """Endless batches from WebDataset shards for one rank (see module doc)."""

    def __init__(self, cfg: DataConfig, shards: ShardSet, *, batch_size: int, rank: int, world_size: int, seed: int,
                 uint8_images: bool = False):
        if cfg.mode not in MODES:
            raise GentrainError(f"data.mode={cfg.mode!r}: choose one of {', '.join(MODES)}")
        check_policy(cfg.bad_sample_policy)
        if cfg.channels not in (1, 3):
            raise GentrainError(f"data.channels={cfg.channels}: choose 1 (grey) or 3 (RGB)")
        if batch_size < 1:
            raise GentrainError(f"batch size must be >= 1, got {batch_size}")
        self.cfg, self.shards, self.batch_size = cfg, shards, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.lanes = max(1, cfg.num_workers)
        self.num_lanes = world_size * self.lanes
        self.group = 1 if cfg.aspect_buckets else self.lanes   # lane-batches joined into one batch
        if batch_size % self.group:
            raise GentrainError(batch_split_error(batch_size, cfg.num_workers))
        self.spec = LaneSpec(
            urls=shards.urls, counts=shards.counts, mode=cfg.mode, seed=seed, num_lanes=self.num_lanes,
            batch_size=batch_size // self.group, shuffle_buffer=max(1, cfg.shuffle_buffer),
            decode=DecodeOptions(image_size=cfg.image_size, channels=cfg.channels, random_crop=cfg.random_crop,
                                 random_flip=cfg.random_flip, aspect_buckets=cfg.aspect_buckets,
                                 aspect_max_ratio=cfg.aspect_max_ratio, max_image_pixels=cfg.max_image_pixels,
                                 require_caption=cfg.require_caption, filters=parse_filters(cfg.filters),
                                 jpeg_draft=cfg.jpeg_draft, size_crop=cfg.size_crop),
            policy=cfg.bad_sample_policy, max_bad_fraction=cfg.max_bad_fraction,
            bad_fraction_min_samples=cfg.bad_fraction_min_samples, allow_pipe=cfg.allow_pipe,
            s3_endpoint_url=cfg.s3_endpoint_url,
            # through a DataLoader's shared memory uint8 is a quarter of the bytes; in-process
            # lanes make float32 themselves (in the read-ahead thread when there is one) unless
            # the consumer takes uint8
            uint8_images=cfg.num_workers > 0 or uint8_images)
        self.uint8_images = uint8_images
        self.consumed_batches = self.consumed_samples = 0
        self.lane_states = [copy.deepcopy(START) for _ in range(self.lanes)]
        self.bad: Counter[str] = Counter()
        self.lost = 0
        self.filtered = 0
        self.epoch = 0

    # -- sizes of an epoch ------------------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch (W*L, the same on every rank)."""
        return self.lanes * range_length(self.shards.total, self.num_lanes)

    @property
    def padding(self) -> int:
        """Padding repeats per epoch across all ranks (at most R*W-1)."""
        return padding(self.shards.total, self.num_lanes)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rotation = self.consumed_batches * self.group % self.lanes
        ds = _LaneDataset(self.spec, self.rank, self.lanes, copy.deepcopy(self.lane_states), rotation)
        prefetch = self.cfg.prefetch if self.cfg.prefetch >= 0 else (2 if torch.cuda.is_available() else 0)
        if self.cfg.num_workers == 0 and prefetch > 0:
            loader = read_ahead(iter(ds), prefetch)   # no DataLoader: nothing draws from torch's RNG
        else:
            loader = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, persistent_workers=False)
        parts: list[dict] = []
        for item in loader:
            if "__error__" in item:
                raise DataError(item["__error__"])
            parts.append(item)
            if len(parts) < self.group:
                continue
            # the lane-batches are taken together, as one batch: the position moves past all of them
            for i, part in enumerate(parts):
                meta = part.pop("__meta__")
                local = (self.consumed_batches * self.group + i) % self.lanes
                if meta["lane"] != self.rank * self.lanes + local:
                    raise RuntimeError(f"batch from lane {meta['lane']} arrived when lane {local} was due")
                self.lane_states[local] = meta["state"]
                self.bad.update(meta["bad"])
                self.lost += meta["lost"]
                self.filtered += meta["filtered"]
            batch = join_lane_batches(parts, uint8_images=self.uint8_images)
            parts = []
            self.consumed_batches += 1
            self.consumed_samples += len(batch["key"])
            if "epoch" in batch:
                self.epoch = int(batch["epoch"].max())
            self._check_bad_fraction()
            yield batch

    def _check_bad_fraction(self) -> None:
        if self.cfg.bad_sample_policy != "skip" or not self.lost:
            return
        seen = self.lost + self.consumed_samples
        if self.lost > self.cfg.max_bad_fraction * max(seen, self.cfg.bad_fraction_min_samples):
            raise DataError(f"too much bad data on rank {self.rank}: {self.lost} of {seen} samples lost "
                            f"({dict(self.bad)}), over data.max_bad_fraction={self.cfg.max_bad_fraction}")

    # -- position ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"kind": "shards", "mode": self.cfg.mode, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "lanes": self.lanes, "shards": self.shards.fingerprint()}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "consumed_batches": self.consumed_batches,
                "consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "lane_states": copy.deepcopy(self.lane_states), "bad": dict(self.bad), "lost": self.lost,
                "filtered": self.filtered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_position(state, self._identity(), "reader", "resume with the same shards, data.mode, "
                       "data.num_workers, seed and number of processes")
        self.consumed_batches = int(state["consumed_batches"])
        self.consumed_samples = int(state["consumed_samples"])
        self.epoch = int(state.get("epoch", 0))
        self.lane_states = copy.deepcopy(state["lane_states"])
        self.bad = Counter(state.get("bad", {}))
        self.lost = int(state.get("lost", 0))
        self.filtered = int(state.get("filtered", 0))

    def remapped_state(self, saved: list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's state for ``load_state_dict`` from every rank's saved state of a run with
        another number of processes or workers (elastic.py); this rank's own saved state when the
        layout is the same."""
        return remap_positions(saved, self.world_size, self.rank, self.lanes, spec=self.spec)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {f"bad/{k}": float(v) for k, v in sorted(self.bad.items())}
        out["bad/samples_lost"] = float(self.lost)
        out["consumed_samples"] = float(self.consumed_samples)
        if self.cfg.filters:
            out["filtered"] = float(self.filtered)
        if self.cfg.aspect_buckets:   # decoded, waiting in this rank's bucket queues for a full batch
            out["bucket_waiting"] = float(sum(len(s["pending"]) for s in self.lane_states))
        if self.cfg.mode == "epoch":
            out["epoch"] = float(self.epoch)
            out["epoch_progress"] = self.consumed_samples / self.samples_per_epoch
            out["padding"] = float(self.padding)
        return out


def make_shard_stream(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                      uint8_images: bool = False) -> ShardStream:
    """The Trainer's stream for ``data.source=shards`` on this rank. With `uint8_images` its
    batches hold images as uint8 (B, C, H, W) in [0, 255], for the consumer to make float on its
    device (decode.batch_images_to_unit): a quarter of the bytes to move, and no conversion in
    the process that feeds the device; else float32 in [-1, 1]."""
    shards = resolve_shards(cfg.shards, allow_pipe=cfg.allow_pipe, s3_endpoint_url=cfg.s3_endpoint_url)
    if shards.total == 0:
        raise DataError(f"data.shards {cfg.shards!r}: the shards hold no samples")
    if shards.scanned and rank == 0:
        from gentrain.data_pipeline.index import report_scan

        report_scan(cfg.shards, shards.scanned, len(shards.urls), shards.scan_seconds)
    if cfg.aspect_buckets and shards.image_sizes and rank == 0:
        report_small_buckets(cfg, shards.image_sizes, batch_size * world_size)
    if rank == 0:  # one line when the images are converted to another mode or size (conversion.py)
        report_conversion(cfg, shards.urls, shards.image_sizes)
    return ShardStream(cfg, shards, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                       uint8_images=uint8_images)


def report_small_buckets(cfg: DataConfig, image_sizes: dict, global_batch: int) -> dict:
    """One line per aspect bucket that holds fewer samples than one global batch: none is dropped,
    they wait in the queues (across epochs) until a batch of them is full."""
    import sys

    from gentrain.data_pipeline.transforms import small_buckets

    small = small_buckets(image_sizes, cfg.image_size, cfg.aspect_max_ratio, global_batch)
    for (h, w), n in small.items():
        print(f"gentrain: data.shards {cfg.shards}: aspect bucket {w}x{h} holds {n} sample(s), fewer than one "
              f"global batch ({global_batch}); they are not dropped but wait across epochs for a full batch "
              f"(data/bucket_waiting counts them)", file=sys.stderr)
    return small
