"""A folder in the layout img2dataset's `--output_format webdataset` writes (written here, offline).

Per shard NNNNN: ``NNNNN.tar`` holding ``KEY.jpg``, ``KEY.txt`` (only with a caption column) and
``KEY.json`` (the row's metadata: url, key, status, error_message, width/height after img2dataset's
resize, original_width/original_height of the source, caption when given, ...); ``NNNNN.parquet``
with one row per *attempted* sample, failed downloads included; ``NNNNN_stats.json`` with
count/successes/failed_to_download/... A failed download appears only in the parquet and stats,
never in the tar. Keys are the shard id (5 digits) then the index in the shard (4 digits).
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from typing import Optional

import numpy as np
from PIL import Image


def jpeg(w: int, h: int, seed: int) -> bytes:
    """A smooth procedural RGB picture (gradients + a disc), JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 255, 3)
    a = np.stack([(x / w) * c[0], (y / h) * c[1], ((x + y) / (w + h)) * c[2]], -1)
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.3) * min(w, h)
    a[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset(out: str, shards: int = 3, per_shard: int = 10, *, failed: tuple[tuple[int, int], ...] = ((1, 3),),
                      sizes: tuple[tuple[int, int], ...] = ((96, 64), (48, 48), (64, 128)), caption: bool = True,
                      parquet: bool = True, stats: bool = True, seed: int = 0) -> dict[str, dict]:
    """Writes the folder; returns {key: json metadata} of the samples that made it into a tar.
    ``failed`` = (shard, index) pairs whose download failed (in parquet/stats only). Each sample's
    stored JPEG has one of ``sizes`` (img2dataset's resize output); its ``original_*`` size is 2x."""
    os.makedirs(out, exist_ok=True)
    rng, kept = random.Random(seed), {}
    for s in range(shards):
        rows, successes = [], 0
        with tarfile.open(os.path.join(out, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                w, h = sizes[(s * per_shard + i) % len(sizes)]
                row: dict[str, Optional[object]] = {"url": f"https://example.com/{key}.jpg", "key": key}
                if caption:
                    row["caption"] = f"a picture number {s * per_shard + i}"
                if (s, i) in failed:
                    row.update(status="failed_to_download", error_message="HTTP Error 404: Not Found", width=None,
                               height=None, original_width=None, original_height=None, exif=None, sha256=None)
                    rows.append(row)
                    continue
                row.update(status="success", error_message=None, width=w, height=h, original_width=2 * w,
                           original_height=2 * h, exif="{}", sha256=f"{rng.getrandbits(128):032x}")
                _add(tar, f"{key}.jpg", jpeg(w, h, seed * 100_000 + s * per_shard + i))
                if caption:
                    _add(tar, f"{key}.txt", str(row["caption"]).encode())
                _add(tar, f"{key}.json", json.dumps(row, indent=4).encode())
                rows.append(row)
                kept[key] = row
                successes += 1
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"{s:05d}.parquet"))
        if stats:
            with open(os.path.join(out, f"{s:05d}_stats.json"), "w") as f:
                json.dump({"count": per_shard, "successes": successes, "failed_to_download": per_shard - successes,
                           "failed_to_resize": 0, "duration": 1.0, "start_time": 0.0, "end_time": 1.0,
                           "status_dict": {"success": successes, "HTTP Error 404: Not Found": per_shard - successes}},
                          f, indent=4)
    return kept
