"""Where shards are: resolve ``data.shards`` to URLs with sample counts, and open a shard URL.

Accepted: a brace pattern (``data/{000000..000006}.tar``), a comma-separated list, a directory
(local or ``s3://bucket/prefix/``) holding ``index.json`` or img2dataset's output (index.py),
``s3://`` URLs (read with boto3, never a
shell) and ``pipe:CMD`` URLs (a shell command: only with ``data.allow_pipe=true``).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Optional

from gentrain.errors import DataError, GentrainError
from gentrain.data_pipeline.index import count_samples, folder_counts
from gentrain.data_pipeline.storage import check_pipe_allowed, expand_urls, is_dir, join, read_text
from gentrain.data_pipeline.tario import TruncatedShard
from gentrain.data_pipeline.writer import INDEX_NAME


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard, from index.json (or counted once if absent)
    image_sizes: Optional[dict] = None   # index.json's {"WxH": samples}, where a folder spec has one
    scanned: int = 0                     # shards counted by reading them (no index.json or img2dataset stats)
    scan_seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> str:
        """Changes when the shard list or counts change (a saved position would not fit)."""
        names = [posixpath.basename(u) for u in self.urls]
        return hashlib.sha1(json.dumps([names, list(self.counts)]).encode()).hexdigest()[:16]


def check_local_shards(spec: str, where: str = "shards") -> None:
    """One line, at once, when a local shard spec names a folder or shard files that do not exist
    (`where` starts the message: "config key 'data.shards'", "--shards")."""
    if not spec or spec.startswith(("s3://", "pipe:")) or ",pipe:" in spec or is_dir(spec.rstrip("/") or "/"):
        return
    urls = expand_urls(spec)
    local = [u[len("file://"):] if u.startswith("file://") else u for u in urls if "://" not in u or u.startswith("file://")]
    missing = [u for u in local if not os.path.exists(u)]
    if not missing:
        return
    if urls == [spec.strip()] and not spec.strip().endswith(".tar"):
        raise GentrainError(f"{where}: the folder {spec} does not exist")
    raise GentrainError(f"{where}: shard {missing[0]} does not exist ({len(missing)} of the {len(urls)} shards "
                        f"{spec} names are missing)")


def resolve_shards(spec: Optional[str], *, allow_pipe: bool = False, s3_endpoint_url: Optional[str] = None) -> ShardSet:
    """URLs and sample counts of ``data.shards``. Counts come from ``index.json`` beside the
    shards; shards it does not list are counted by reading their tar headers."""
    if not spec:
        raise GentrainError("data.shards is not set: give a directory with index.json, a brace pattern "
                            "like data/{000000..000003}.tar, or a comma-separated list")
    check_local_shards(spec)
    if spec.startswith("pipe:") or ",pipe:" in spec:
        check_pipe_allowed(spec, allow_pipe)
    known: dict[str, int] = {}
    if not spec.startswith("pipe:") and is_dir(spec):
        text = read_text(join(spec, INDEX_NAME), s3_endpoint_url)
        if text is not None:
            index = json.loads(text)
            urls = [join(spec, s["name"]) for s in index["shards"]]
            counts = [int(s["samples"]) for s in index["shards"]]
            return ShardSet(tuple(urls), tuple(counts), index.get("image_sizes"))
        urls, found = folder_counts(spec, s3_endpoint_url=s3_endpoint_url)
        known = {u: c for u, c in zip(urls, found) if c is not None}
    else:
        urls = expand_urls(spec)
        # counts from the index.json of each folder the shards live in, if any
        for folder in sorted({posixpath.dirname(u) for u in urls if not u.startswith("pipe:")}):
            text = read_text(join(folder, INDEX_NAME) if folder else INDEX_NAME, s3_endpoint_url)
            if text:
                for s in json.loads(text)["shards"]:
                    known[join(folder, s["name"]) if folder else s["name"]] = int(s["samples"])
    counts, scanned, t0 = [], 0, time.time()
    for u in urls:
        if u not in known:
            try:
                known[u] = count_samples(u, allow_pipe=allow_pipe, s3_endpoint_url=s3_endpoint_url)
            except (OSError, TruncatedShard) as e:
                raise DataError(f"shard {u}: cannot count its samples (no index.json lists it): {e}") from e
            scanned += 1
        counts.append(known[u])
    return ShardSet(tuple(urls), tuple(counts), scanned=scanned, scan_seconds=time.time() - t0 if scanned else 0.0)
