"""Raw (undecoded) samples of a tar shard: members grouped by key, WebDataset's convention.

``iter_raw_samples`` yields samples ``start..stop-1`` of a shard; members of the samples before
``start`` are stepped over from their headers, their bytes are never extracted or decoded.
"""
from __future__ import annotations

import re
import tarfile
from typing import IO, Iterator

RawSample = dict  # {"__key__": str, "__shard__": str, ext: bytes, ...}

# key = path up to the first dot of the file name; ext = the rest ("x.npy", "png")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def sample_key(name: str) -> tuple[str, str]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


class TruncatedShard(Exception):
    """The tar ended or broke before the planned samples were read."""


def iter_raw_samples(fileobj: IO[bytes], shard: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
    """Samples ``[start, stop)`` of an open tar stream, as dicts of raw member bytes.

    Raises TruncatedShard if the stream breaks mid-way or ends before ``stop`` samples.
    """
    index, cur = -1, None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = sample_key(m.name)
                if cur is None or key != cur["__key__"]:
                    if cur is not None and index >= start:
                        yield cur
                    index += 1
                    if stop is not None and index >= stop:
                        return
                    cur = {"__key__": key, "__shard__": shard}
                if index >= start and ext:
                    cur[ext] = tf.extractfile(m).read()
            if cur is not None and index >= start:
                if stop is None or index < stop:
                    yield cur
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TruncatedShard(f"{type(e).__name__}: {e}") from e
    if stop is not None and index + 1 < stop:
        raise TruncatedShard(f"ended after {index + 1} samples, index.json says at least {stop}")
