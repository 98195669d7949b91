"""Storage: read, write and list local paths, ``s3://`` URLs (boto3, never a shell) and ``pipe:CMD``
URLs (a shell command: only with ``data.allow_pipe=true``). The shard list, the index and the
readers go through here; nothing else in gentrain speaks to S3 or spawns a pipe."""
from __future__ import annotations

import io
import os
import subprocess
from typing import IO, Optional

import braceexpand

from gentrain.data_pipeline.writer import _atomic_write_text
from gentrain.errors import DataError, GentrainError


_S3_CLIENTS: dict = {}


def s3_client(endpoint_url: Optional[str]):
    """One boto3 client per process and endpoint (a client's connections must not cross a fork)."""
    key = (os.getpid(), endpoint_url)
    if key not in _S3_CLIENTS:
        try:
            import boto3
        except ImportError as e:
            raise GentrainError("s3:// shards need boto3: pip install boto3") from e
        _S3_CLIENTS[key] = boto3.client("s3", endpoint_url=endpoint_url or None)
    return _S3_CLIENTS[key]


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def open_url(url: str, *, allow_pipe: bool = False, s3_endpoint_url: Optional[str] = None) -> IO[bytes]:
    """A readable byte stream of a shard. Errors are OSError/GentrainError subclasses."""
    if url.startswith("pipe:"):
        check_pipe_allowed(url, allow_pipe)
        proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return _PipeStream(proc, url)
    if url.startswith("s3://"):
        bucket, key = split_s3(url)
        try:
            return s3_client(s3_endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
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


def read_text(url: str, s3_endpoint_url: Optional[str]) -> Optional[str]:
    """The text at a local path or s3 URL, None if it does not exist."""
    if url.startswith("s3://"):
        bucket, key = split_s3(url)
        client = s3_client(s3_endpoint_url)
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


def is_dir(spec: str) -> bool:
    return spec.endswith("/") or (not spec.startswith(("s3://", "pipe:")) and os.path.isdir(spec))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def expand_urls(spec: str) -> list[str]:
    """The URLs of a brace pattern or comma-separated list."""
    return [u for part in spec.split(",") if part.strip() for u in braceexpand.braceexpand(part.strip())]


def list_folder(spec: str, s3_endpoint_url: Optional[str]) -> list[str]:
    """Names of the files directly in a local folder or under an s3:// prefix (one paginated list)."""
    if spec.startswith("s3://"):
        bucket, prefix = split_s3(spec.rstrip("/") + "/")
        client, names = s3_client(s3_endpoint_url), []
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


def write_text(url: str, text: str, s3_endpoint_url: Optional[str]) -> None:
    """An atomic write of a local file (temp + rename), or one PUT of an s3 object."""
    if url.startswith("s3://"):
        bucket, key = split_s3(url)
        try:
            s3_client(s3_endpoint_url).put_object(Bucket=bucket, Key=key, Body=text.encode())
        except Exception as e:
            raise DataError(f"cannot write {url}: {e}") from e
        return
    _atomic_write_text(url, text)
