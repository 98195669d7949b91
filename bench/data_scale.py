"""Data at scale (issue 12): a procedural img2dataset-style folder of JPEGs of mixed sizes (no
downloads), then, side by side in one run:

- start-up: counts from img2dataset stats files, from a tar-header scan, from index.json, and the
  time of `gentrain data index` itself (2 processes);
- reader samples/s at 256 px, in-process and with 1 and 2 loader workers, with and without JPEG
  draft decoding, against a bare loop (tarfile + ``PIL.Image.open().convert().resize()``) over
  the same samples, as the Trainer reads (uint8 batches made float on its device) and, at 1 and 2
  workers, with the float conversion in the consuming process; the consuming process's share of
  a core beside each;
- the reader's peak RSS at start with 1,000 and 20,000 tiny shards (one subprocess each).

usage: python bench/data_scale.py [--samples 20000] [--read 1500] [--out bench/results/data_scale.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from data_helpers.img2dataset import write_img2dataset  # noqa: E402


def bare_loop(folder: str, n: int, size: int) -> float:
    """samples/s of tarfile + PIL open/convert/resize over the first n samples."""
    from PIL import Image

    t0, done = time.perf_counter(), 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(folder, name)) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB").resize((size, size))
                    done += 1
                    if done >= n:
                        return done / (time.perf_counter() - t0)
    return done / (time.perf_counter() - t0)


def reader_rate(folder: str, n: int, size: int, workers: int, draft: bool, uint8: bool = True) -> tuple[float, float]:
    """samples/s of the reader, and the consuming process's share of a core while it reads.
    ``uint8``: the Trainer's stream (images uint8, made float on the device afterwards); else
    float32 made in the consuming process, which here, on a CPU device, is the same work."""
    from gentrain.data_pipeline.config import DataConfig
    from gentrain.data_pipeline.reader import make_shard_stream

    batch = 50
    cfg = DataConfig(source="shards", shards=folder, image_size=size, num_workers=workers, prefetch=0,
                     jpeg_draft=draft, shuffle_buffer=100)
    st = make_shard_stream(cfg, batch_size=batch, rank=0, world_size=1, seed=0, uint8_images=uint8)
    it = iter(st)
    next(it)   # workers started, first batch read: start-up is measured apart
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n // batch):
        next(it)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return (n // batch) * batch / (t1 - t0), cpu / (t1 - t0)


RSS_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[2])
from gentrain.data_pipeline.config import DataConfig
from gentrain.data_pipeline.reader import make_shard_stream
t0 = time.perf_counter()
st = make_shard_stream(DataConfig(source="shards", shards=sys.argv[1], image_size=16, prefetch=0),
                       batch_size=4, rank=0, world_size=1, seed=0)
it = iter(st); [next(it) for _ in range(5)]
print(json.dumps({"start_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def tiny_shards(folder: str, n: int) -> None:
    """n shards of one 8x8 JPEG sample each, and their index.json."""
    from PIL import Image

    from gentrain.data_pipeline.writer import INDEX_FORMAT

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 99, 199)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    os.makedirs(folder, exist_ok=True)
    for s in range(n):
        with tarfile.open(os.path.join(folder, f"{s:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for ext, data in (("jpg", jpg), ("txt", b"a square")):
                info = tarfile.TarInfo(f"{s:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"format": INDEX_FORMAT, "samples": n,
                   "shards": [{"name": f"{s:06d}.tar", "samples": 1} for s in range(n)]}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--read", type=int, default=1500, help="samples timed per reader configuration")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rss-shards", default="1000,20000")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "data_scale.json"))
    a = ap.parse_args()
    from gentrain.data_pipeline.index import build_index
    from gentrain.data_pipeline.shardlist import resolve_shards

    res: dict = {"conditions": f"{os.cpu_count()} CPUs; JPEG sources 576-1024 px (img2dataset-style folder), "
                               f"training size {a.size}"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "i2d")
        t0 = time.perf_counter()
        sizes = ((768, 576), (1024, 768), (640, 640), (576, 768), (960, 720))
        shards = -(-a.samples // a.per_shard)
        write_img2dataset(folder, shards=shards, per_shard=a.per_shard, failed=((0, 1),), sizes=sizes, parquet=False)
        res["build_s"], res["samples"], res["shards"] = round(time.perf_counter() - t0, 1), a.samples - 1, shards
        t0 = time.perf_counter()
        resolve_shards(folder)
        res["start_from_stats_s"] = round(time.perf_counter() - t0, 3)
        pattern = os.path.join(folder, "{%05d..%05d}.tar" % (0, shards - 1))
        t0 = time.perf_counter()
        resolve_shards(pattern)
        res["start_by_scan_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        build_index(folder, processes=2)
        res["data_index_2proc_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        resolve_shards(folder)
        res["start_from_index_s"] = round(time.perf_counter() - t0, 3)
        n = min(a.read, a.samples - 1)
        bare = bare_loop(folder, n, a.size)
        res["bare_loop_samples_s"] = round(bare, 1)
        # in-process (data.num_workers=0), then 1 and 2 DataLoader workers, as the Trainer reads:
        # uint8 batches (through shared memory from workers), made float32 on the device
        for workers in (0, 1, 2):
            for draft in (True, False):
                r, share = reader_rate(folder, n, a.size, workers, draft)
                key = f"reader_{f'{workers}w' if workers else 'in_process'}_{'draft' if draft else 'full'}"
                res[key + "_samples_s"], res[key + "_vs_bare"] = round(r, 1), round(r / bare, 2)
                res[key + "_consumer_core_share"] = round(share, 2)
        # the float32 conversion in the consuming process instead (a CPU device does it there anyway)
        for workers in (1, 2):
            r, share = reader_rate(folder, n, a.size, workers, True, uint8=False)
            key = f"reader_{workers}w_draft_float_in_consumer"
            res[key + "_samples_s"], res[key + "_consumer_core_share"] = round(r, 1), round(share, 2)
        res["two_workers_vs_one"] = round(res["reader_2w_draft_samples_s"] / res["reader_1w_draft_samples_s"], 2)
        res["two_workers_vs_one_float_in_consumer"] = round(res["reader_2w_draft_float_in_consumer_samples_s"] /
                                                            res["reader_1w_draft_float_in_consumer_samples_s"], 2)
        res["two_workers_vs_in_process"] = round(res["reader_2w_draft_samples_s"] /
                                                 res["reader_in_process_draft_samples_s"], 2)
        for count in map(int, a.rss_shards.split(",")):
            tiny = os.path.join(tmp, f"tiny{count}")
            tiny_shards(tiny, count)
            out = subprocess.run([sys.executable, "-c", RSS_CHILD, tiny, ROOT], capture_output=True, text=True,
                                 check=True, timeout=600)
            res[f"reader_{count}_shards"] = json.loads(out.stdout.strip().splitlines()[-1])
    res["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
