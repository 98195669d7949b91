"""Shard folders without a gentrain ``index.json``: img2dataset's output read as it is, and
``gentrain data index`` (an index for any shard set, written once, so no training run scans).

img2dataset writes ``NNNNN.tar`` with ``NNNNN_stats.json`` beside it, whose ``successes`` is the
number of samples in the tar (failed downloads are only in the stats and ``NNNNN.parquet``). A
folder's sample counts come from, in order: its ``index.json``; else each tar's
``NNNNN_stats.json``; else a scan of the tar headers (reported once, with its time).
"""
from __future__ import annotations

import json
import os
import posixpath
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from ..errors import DataError, GentrainError

STATS_SUFFIX = "_stats.json"


def list_folder(spec: str, s3_endpoint_url: Optional[str]) -> list[str]:
    """Names of the files directly in a local folder or under an s3:// prefix (one paginated list)."""
    if spec.startswith("s3://"):
        from .shardlist import _s3_client, _split_s3

        bucket, prefix = _split_s3(spec.rstrip("/") + "/")
        client, names = _s3_client(s3_endpoint_url), []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        except Exception as e:  # no bucket, no access, no server
            raise DataError(f"data.shards {spec!r}: cannot list the prefix: {e}") from e
        return sorted(names)
    try:
        return sorted(n for n in os.listdir(spec) if os.path.isfile(os.path.join(spec, n)))
    except OSError as e:
        raise DataError(f"data.shards {spec!r}: cannot list the folder: {e}") from e


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
    from .shardlist import _join, _read_text

    names, tars = folder_tars(spec, s3_endpoint_url)
    have = set(names)
    stats = {t: _join(spec, t[:-len(".tar")] + STATS_SUFFIX) for t in tars if t[:-len(".tar")] + STATS_SUFFIX in have}

    def read(t: str) -> Optional[int]:
        if t not in stats:
            return None
        text = _read_text(stats[t], s3_endpoint_url)
        return None if text is None else stats_count(text, stats[t])

    with ThreadPoolExecutor(16 if spec.startswith("s3://") else 1) as pool:
        counts = list(pool.map(read, tars))
    return [_join(spec, t) for t in tars], counts


def report_scan(spec: str, scanned: int, total: int, seconds: float) -> None:
    """The one line a run prints when it had to count shards by reading them."""
    print(f"gentrain: data.shards {spec}: {scanned} of {total} shard(s) have no index.json entry or img2dataset "
          f"stats, so their samples were counted by reading their tar headers ({seconds:.1f} s); "
          f"write an index once with `gentrain data index {spec}`", file=sys.stderr)


# -- gentrain data index ----------------------------------------------------------------------
def scan_shard(args: tuple[str, bool, bool, Optional[str]]) -> dict[str, Any]:
    """{"samples", "image_sizes"} of one shard, read from its tar headers (and with
    ``sizes`` the headers of its main images, which reads their bytes)."""
    from .shardlist import count_samples
    from .tario import TruncatedShard

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
    from .shardlist import _is_dir, _join, _read_text, expand_urls
    from .writer import INDEX_FORMAT, INDEX_NAME

    if spec.startswith("pipe:") or ",pipe:" in spec:
        raise GentrainError(f"{spec!r}: an index is written beside the shards; pipe: URLs have no folder")
    urls = [_join(spec, t) for t in folder_tars(spec, s3_endpoint_url)[1]] if _is_dir(spec) else expand_urls(spec)
    folders: dict[str, list[str]] = {}
    for u in urls:
        folders.setdefault(posixpath.dirname(u) or ".", []).append(u)
    if not overwrite:
        for folder in folders:
            if _read_text(_join(folder, INDEX_NAME), s3_endpoint_url) is not None:
                raise GentrainError(f"{_join(folder, INDEX_NAME)} exists; pass --overwrite to replace it")
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
        write_text(_join(folder, INDEX_NAME), json.dumps(index, indent=1) + "\n", s3_endpoint_url)
        out[folder] = index
    return out


def write_text(url: str, text: str, s3_endpoint_url: Optional[str]) -> None:
    """An atomic write of a local file (temp + rename), or one PUT of an s3 object."""
    if url.startswith("s3://"):
        from .shardlist import _s3_client, _split_s3

        bucket, key = _split_s3(url)
        try:
            _s3_client(s3_endpoint_url).put_object(Bucket=bucket, Key=key, Body=text.encode())
        except Exception as e:
            raise DataError(f"cannot write {url}: {e}") from e
        return
    from .writer import _atomic_write_text

    _atomic_write_text(url, text)
