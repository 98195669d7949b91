"""Where shards are: resolve ``data.shards`` to URLs with sample counts, and open a shard URL.

Accepted: a brace pattern (``data/{000000..000006}.tar``), a comma-separated list, a directory
(local or ``s3://bucket/prefix/``) holding ``index.json`` or img2dataset's output (index.py),
``s3://`` URLs (read with boto3, never a
shell) and ``pipe:CMD`` URLs (a shell command: only with ``data.allow_pipe=true``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from typing import IO, Optional

import braceexpand
from PIL import Image

from ..errors import DataError, GentrainError
from .tario import TruncatedShard, iter_members, sample_key
from .writer import IMAGE_EXTS, INDEX_NAME


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


_S3_CLIENTS: dict = {}


def _s3_client(endpoint_url: Optional[str]):
    """One boto3 client per process and endpoint (a client's connections must not cross a fork)."""
    key = (os.getpid(), endpoint_url)
    if key not in _S3_CLIENTS:
        try:
            import boto3
        except ImportError as e:
            raise GentrainError("s3:// shards need boto3: pip install boto3") from e
        _S3_CLIENTS[key] = boto3.client("s3", endpoint_url=endpoint_url or None)
    return _S3_CLIENTS[key]


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def open_url(url: str, *, allow_pipe: bool = False, s3_endpoint_url: Optional[str] = None) -> IO[bytes]:
    """A readable byte stream of a shard. Errors are OSError/GentrainError subclasses."""
    if url.startswith("pipe:"):
        check_pipe_allowed(url, allow_pipe)
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return _PipeStream(proc, url)
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        try:
            return _s3_client(s3_endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:  # botocore's ClientError / EndpointConnectionError
            raise OSError(f"cannot read {url}: {e}") from e
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise GentrainError(f"shard URL {url!r}: only local paths, s3:// and pipe: are supported")
    return open(url, "rb", buffering=1 << 20)


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit at the end is a read error."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0 and self.proc.wait() != 0:
            raise OSError(f"{self.url}: command exited with status {self.proc.returncode}")
        return n

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        super().close()


def check_pipe_allowed(spec: str, allow_pipe: bool) -> None:
    if not allow_pipe:
        raise GentrainError(f"shards {spec!r}: pipe: URLs run a shell command; set data.allow_pipe=true "
                            "to allow it (or use a path or s3:// URL)")


def _read_text(url: str, s3_endpoint_url: Optional[str]) -> Optional[str]:
    """The text at a local path or s3 URL, None if it does not exist."""
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        client = _s3_client(s3_endpoint_url)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return None
        except Exception as e:  # no bucket, no access, no server
            raise DataError(f"cannot read {url}: {e}") from e
    if os.path.isfile(url):
        with open(url) as f:
            return f.read()
    return None


def _is_dir(spec: str) -> bool:
    return spec.endswith("/") or (not spec.startswith(("s3://", "pipe:")) and os.path.isdir(spec))


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


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


def expand_urls(spec: str) -> list[str]:
    """The URLs of a brace pattern or comma-separated list."""
    return [u for part in spec.split(",") if part.strip() for u in braceexpand.braceexpand(part.strip())]


def check_local_shards(spec: str, where: str = "shards") -> None:
    """One line, at once, when a local shard spec names a folder or shard files that do not exist
    (`where` starts the message: "config key 'data.shards'", "--shards")."""
    if not spec or spec.startswith(("s3://", "pipe:")) or ",pipe:" in spec or _is_dir(spec.rstrip("/") or "/"):
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
    if not spec.startswith("pipe:") and _is_dir(spec):
        text = _read_text(_join(spec, INDEX_NAME), s3_endpoint_url)
        if text is not None:
            index = json.loads(text)
            urls = [_join(spec, s["name"]) for s in index["shards"]]
            counts = [int(s["samples"]) for s in index["shards"]]
            return ShardSet(tuple(urls), tuple(counts), index.get("image_sizes"))
        from .index import folder_counts   # an img2dataset folder (stats files), or plain tars

        urls, found = folder_counts(spec, s3_endpoint_url=s3_endpoint_url)
        known = {u: c for u, c in zip(urls, found) if c is not None}
    else:
        urls = expand_urls(spec)
        # counts from the index.json of each folder the shards live in, if any
        for folder in sorted({posixpath.dirname(u) for u in urls if not u.startswith("pipe:")}):
            text = _read_text(_join(folder, INDEX_NAME) if folder else INDEX_NAME, s3_endpoint_url)
            if text:
                for s in json.loads(text)["shards"]:
                    known[_join(folder, s["name"]) if folder else s["name"]] = int(s["samples"])
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
