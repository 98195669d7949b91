"""Shard folders without a gentrain ``index.json``: img2dataset's output read as it is, and
``gentrain data index`` (an index for any shard set, written once, so no training run scans).

img2dataset writes ``NNNNN.tar`` with ``NNNNN_stats.json`` beside it, whose ``successes`` is the
number of samples in the tar (failed downloads are only in the stats and ``NNNNN.parquet``). A
folder's sample counts come from, in order: its ``index.json``; else each tar's
``NNNNN_stats.json``; else a scan of the tar headers (reported once, with its time).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from PIL import Image

from gentrain.data_pipeline.storage import expand_urls, is_dir, join, list_folder, open_url, read_text, write_text
from gentrain.data_pipeline.tario import iter_members, sample_key
from gentrain.data_pipeline.writer import IMAGE_EXTS
from gentrain.errors import DataError, GentrainError

STATS_SUFFIX = "_stats.json"


def count_samples(url: str, *, allow_pipe: bool = False, s3_endpoint_url: Optional[str] = None,
                  image_sizes: Optional[Counter] = None) -> int:
    """Samples in a shard (consecutive members sharing a key), read from tar headers only; with
    ``image_sizes``, also counts "WxH" of each sample's first image (which reads its bytes)."""
    n, last, sized = 0, None, None
    want = (lambda name: sample_key(name)[1] in IMAGE_EXTS) if image_sizes is not None else (lambda name: False)
    with open_url(url, allow_pipe=allow_pipe, s3_endpoint_url=s3_endpoint_url) as f:
        for name, data in iter_members(f, want=want):
            key = sample_key(name)[0]
            if key != last:
                n, last = n + 1, key
            if data is not None and key != sized:
                sized = key
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        image_sizes[f"{im.width}x{im.height}"] += 1
                except Exception:  # noqa: BLE001 - a corrupt image is counted, the reader skips it
                    image_sizes["unreadable"] += 1
    return n


def stats_count(text: str, url: str) -> int:
    try:
        return int(json.loads(text)["successes"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{url}: not an img2dataset stats file with an integer 'successes' ({e})") from e


def folder_tars(spec: str, s3_endpoint_url: Optional[str]) -> tuple[list[str], list[str]]:
    """The file names of a shard folder (local or s3://) and its ``.tar`` shards among them."""
    names = list_folder(spec, s3_endpoint_url)
    tars = [n for n in names if n.endswith(".tar")]
    if not tars:
        raise GentrainError(f"{spec!r}: the folder holds no index.json and no .tar shards")
    return names, tars


def folder_counts(spec: str, *, s3_endpoint_url: Optional[str]) -> tuple[list[str], list[Optional[int]]]:
    """The tars of a folder without index.json, and their counts from img2dataset's stats files
    (None where a tar has none). Stats are read by a few threads (one GET each on S3)."""
    names, tars = folder_tars(spec, s3_endpoint_url)
    have = set(names)
    stats = {t: join(spec, t[:-len(".tar")] + STATS_SUFFIX) for t in tars if t[:-len(".tar")] + STATS_SUFFIX in have}

    def read(t: str) -> Optional[int]:
        if t not in stats:
            return None
        text = read_text(stats[t], s3_endpoint_url)
        return None if text is None else stats_count(text, stats[t])

    with ThreadPoolExecutor(16 if spec.startswith("s3://") else 1) as pool:
        counts = list(pool.map(read, tars))
    return [join(spec, t) for t in tars], counts


def report_scan(spec: str, scanned: int, total: int, seconds: float) -> None:
    """The one line a run prints when it had to count shards by reading them."""
    print(f"gentrain: data.shards {spec}: {scanned} of {total} shard(s) have no index.json entry or img2dataset "
          f"stats, so their samples were counted by reading their tar headers ({seconds:.1f} s); "
          f"write an index once with `gentrain data index {spec}`", file=sys.stderr)


# -- gentrain data index ----------------------------------------------------------------------
def scan_shard(args: tuple[str, bool, bool, Optional[str]]) -> dict[str, Any]:
    """{"samples", "image_sizes"} of one shard, read from its tar headers (and with
    ``sizes`` the headers of its main images, which reads their bytes)."""
    from gentrain.data_pipeline.tario import TruncatedShard

    url, sizes, allow_pipe, endpoint = args
    wh: Counter[str] = Counter()
    try:
        n = count_samples(url, allow_pipe=allow_pipe, s3_endpoint_url=endpoint, image_sizes=wh if sizes else None)
    except (OSError, TruncatedShard) as e:
        raise DataError(f"shard {url}: cannot be indexed: {e}") from e
    return {"samples": n, "image_sizes": dict(wh)}


def build_index(spec: str, *, processes: int = 0, sizes: bool = False, allow_pipe: bool = False,
                s3_endpoint_url: Optional[str] = None, overwrite: bool = False) -> dict[str, dict]:
    """Write ``index.json`` into every folder the shards of ``spec`` live in (a folder, a brace
    pattern or a list; local or s3://), counting the shards across ``processes`` worker
    processes (0: one per CPU). Returns {folder: index}."""
    from gentrain.data_pipeline.writer import INDEX_FORMAT, INDEX_NAME

    if spec.startswith("pipe:") or ",pipe:" in spec:
        raise GentrainError(f"{spec!r}: an index is written beside the shards; pipe: URLs have no folder")
    urls = [join(spec, t) for t in folder_tars(spec, s3_endpoint_url)[1]] if is_dir(spec) else expand_urls(spec)
    folders: dict[str, list[str]] = {}
    for u in urls:
        folders.setdefault(posixpath.dirname(u) or ".", []).append(u)
    if not overwrite:
        for folder in folders:
            if read_text(join(folder, INDEX_NAME), s3_endpoint_url) is not None:
                raise GentrainError(f"{join(folder, INDEX_NAME)} exists; pass --overwrite to replace it")
    t0 = time.time()
    jobs = [(u, sizes, allow_pipe, s3_endpoint_url) for u in urls]
    processes = processes or os.cpu_count() or 1
    if processes > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(processes, len(jobs))) as pool:
            results = pool.map(scan_shard, jobs, chunksize=max(1, len(jobs) // (8 * processes)))
    else:
        results = [scan_shard(j) for j in jobs]
    by_url = dict(zip(urls, results))
    out = {}
    for folder, members in folders.items():
        wh: Counter[str] = Counter()
        for u in members:
            wh.update(by_url[u]["image_sizes"])
        index = {"format": INDEX_FORMAT, "source": f"gentrain data index {spec}",
                 "samples": sum(by_url[u]["samples"] for u in members),
                 "shards": [{"name": posixpath.basename(u), "samples": by_url[u]["samples"]} for u in members],
                 **({"image_sizes": dict(sorted(wh.items()))} if sizes else {}),
                 "seconds": round(time.time() - t0, 2)}
        write_text(join(folder, INDEX_NAME), json.dumps(index, indent=1) + "\n", s3_endpoint_url)
        out[folder] = index
    return out
