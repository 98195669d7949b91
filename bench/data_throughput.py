"""Reader throughput against a bare tarfile + PIL loop over the same shards, in one run.

    python bench/data_throughput.py                       # builds 32-px digits shards in a temp dir
    python bench/data_throughput.py --shards data/digits --workers 2 --out bench/results/data.json

Figures (samples/s): ``bare`` opens each tar with ``tarfile`` and decodes every image with PIL
(to RGB, as an array); ``reader_w0`` is gentrain's reader in the process (one lane: raw read,
shuffle buffer, safe decode, resize/crop, normalise to [-1, 1], collate); ``reader_wN`` uses N
DataLoader workers, reported in total and per worker. Target: reader_w0 / bare >= 0.9.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gentrain.data_pipeline.config import DataConfig  # noqa: E402
from gentrain.data_pipeline.reader import make_shard_stream  # noqa: E402
from gentrain.data_pipeline.shardlist import resolve_shards  # noqa: E402
from gentrain.data_pipeline.sources import build_source  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def bare_loop(urls: list[str], n: int) -> float:
    """samples/s of tarfile + PIL decode, cycling over the shards until n images."""
    done, t0 = 0, time.perf_counter()
    while done < n:
        for url in urls:
            with tarfile.open(url, mode="r|") as tf:
                for m in tf:
                    if m.name.endswith(IMAGE_EXTS):
                        im = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                        np.asarray(im)
                        done += 1
                        if done >= n:
                            return done / (time.perf_counter() - t0)
    return done / (time.perf_counter() - t0)


def reader(shards: str, n: int, workers: int, batch_size: int, image_size: int) -> float:
    cfg = DataConfig(source="shards", shards=shards, num_workers=workers, image_size=image_size)
    st = make_shard_stream(cfg, batch_size=batch_size, rank=0, world_size=1, seed=0)
    it = iter(st)
    next(it)  # worker start-up is not throughput
    done, t0 = 0, time.perf_counter()
    while done < n:
        done += len(next(it)["key"])
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="a shard set (directory with index.json); default: build 32-px digits")
    ap.add_argument("--samples", type=int, default=6000, help="images timed per measurement")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the multi-worker figure")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--no-training", action="store_true",
                    help="skip the training images/s with/without latent caching (bench/caching_speedup.py, ~5 min)")
    args = ap.parse_args()

    tmp = None
    if args.shards is None:
        tmp = tempfile.TemporaryDirectory()
        args.shards = tmp.name
        build_source("digits", tmp.name, size=args.image_size, max_samples=300)
    urls = list(resolve_shards(args.shards).urls)
    best = lambda f: max(f() for _ in range(args.repeats))  # noqa: E731
    bare = best(lambda: bare_loop(urls, args.samples))
    r0 = best(lambda: reader(args.shards, args.samples, 0, args.batch_size, args.image_size))
    rw = best(lambda: reader(args.shards, args.samples, args.workers, args.batch_size, args.image_size))
    result = {
        "shards": args.shards if tmp is None else "digits 32px (built in a temp dir)",
        "cpu_count": os.cpu_count(),
        "samples_timed": args.samples,
        "bare_tarfile_pil_samples_per_s": round(bare, 1),
        "reader_w0_samples_per_s": round(r0, 1),
        "reader_vs_bare_per_worker": round(r0 / bare, 3),
        f"reader_w{args.workers}_samples_per_s": round(rw, 1),
        f"reader_w{args.workers}_per_worker_samples_per_s": round(rw / args.workers, 1),
        "target_reader_vs_bare": 0.9,
    }
    if not args.no_training:  # the second half: training images/s with and without latent caching
        from caching_speedup import measure

        result["training_cached_vs_uncached"] = measure()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
