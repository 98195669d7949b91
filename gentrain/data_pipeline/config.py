"""Typed configuration of the data pipeline (the `data:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DatasetConfig:
    """One entry of ``data.datasets`` (weighted mixing, mixing.py)."""
    shards: str = ""                  # as data.shards: folder, brace pattern, list, s3:// prefix
    weight: float = 1.0               # its share of every batch (weights are normalised)
    name: Optional[str] = None        # in the metrics (data/NAME/...); default d0, d1, ...


@dataclass
class DataConfig:
    # where batches come from: "toy2d" draws 2-D points in process (the seed's distributions);
    # "shards" reads WebDataset tar shards (`shards` below)
    source: str = "toy2d"
    # toy2d distribution: checkerboard | 8gaussians | moons | ring8 | grid25
    toy2d: str = "checkerboard"
    # shards: brace pattern, comma-separated list, directory (with index.json), s3:// or pipe: URL
    shards: Optional[str] = None
    # or several shard sets mixed by weight, each batch holding every set's share (mixing.py):
    # [{shards: data/laion, weight: 0.7}, {shards: data/cc12m, weight: 0.3, name: cc12m}]
    datasets: list[DatasetConfig] = field(default_factory=list)
    # epoch: every sample exactly once per epoch across ranks x workers; resampled: endless stream
    mode: str = "epoch"
    allow_pipe: bool = False          # `pipe:` URLs run a shell command: opt in explicitly
    num_workers: int = 0
    # with num_workers=0: batches read ahead by a background thread of the training process, overlapping
    # the reader with the step; 0 reads inside the training loop; -1 (auto): 2 with a CUDA device, else 0
    # (a CPU step already uses every core: the thread measured 18% slower on 2 cores, bench/caching_speedup.py)
    prefetch: int = -1
    shuffle_buffer: int = 1000
    image_size: int = 32
    channels: int = 3                 # 1 (L) or 3 (RGB)
    random_crop: bool = False
    random_flip: bool = False
    aspect_buckets: bool = False
    aspect_max_ratio: float = 2.0     # buckets span W/H from 1/ratio to ratio (7 buckets)
    require_caption: bool = True      # an image sample without txt is bad (missing_caption)
    max_image_pixels: int = 64_000_000  # larger images are bad (oversized_image): decompression bombs
    bad_sample_policy: str = "skip"   # skip | fail
    max_bad_fraction: float = 0.01
    bad_fraction_min_samples: int = 100  # the fraction is taken over at least this many samples
    s3_endpoint_url: Optional[str] = None  # for s3:// shards on a non-AWS server (else AWS_ENDPOINT_URL)
    # keep only samples whose json member passes every filter, e.g. ["original_width>=512", "status==success"]
    # (FIELD OP VALUE, OP one of >= <= > < == !=): checked before any image is decoded, counted as
    # data/filtered, not as bad data; a sample without the field is filtered out
    filters: list[str] = field(default_factory=list)
    # JPEGs are decoded straight to about the size they are resized to (libjpeg's DCT scaling, PIL's
    # draft mode) before the exact resize/crop: within ~1/255 of a full decode, much faster on large sources
    jpeg_draft: bool = True
    # each image sample also carries size_crop = (original height, original width, crop top, crop left):
    # the json's original_height/original_width (img2dataset writes them) else the stored image's size, and
    # the crop in the resized image's pixels (mirrored with a flip), as diffusers' SDXL training script
    # measures them; SDXL's micro-conditioning reads it (a fine-tune of an SDXL pipeline turns this on)
    size_crop: bool = False


def dataset_names(d: DataConfig) -> list[str]:
    """The names of data.datasets' entries (in the metrics): their own, else d0, d1, ..."""
    return [ds.name or f"d{i}" for i, ds in enumerate(d.datasets)]


def shard_specs(d: DataConfig) -> list[str]:
    """Every shard set a run reads: data.shards, or each entry of data.datasets."""
    return [ds.shards for ds in d.datasets] if d.datasets else [d.shards] if d.shards else []


def batch_split_error(batch_size: int, num_workers: int) -> str:
    """The one-line error for a shard batch that the workers' lanes cannot share equally (reader.py)."""
    return (f"config key 'train.batch_size': {batch_size} must be a multiple of data.num_workers={num_workers} "
            f"(each worker's lane reads an equal share of every batch)")
