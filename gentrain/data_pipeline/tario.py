"""Raw (undecoded) samples of a tar shard: members grouped by key, WebDataset's convention.

``iter_raw_samples`` yields samples ``start..stop-1`` of a shard; members of the samples before
``start`` are stepped over from their headers, their bytes are never kept or decoded. The tar
headers are parsed here (ustar, GNU long names, PAX paths) rather than by ``tarfile``, whose
per-member header parsing costs more than decoding a small PNG; checksums are verified.
"""
from __future__ import annotations

import re
from typing import IO, Iterator, Optional

RawSample = dict  # {"__key__": str, "__shard__": str, ext: bytes, ...}

BLOCK = 512
# key = path up to the first dot of the file name; ext = the rest ("x.npy", "png")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def sample_key(name: str) -> tuple[str, str]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


class TruncatedShard(Exception):
    """The tar ended or broke before the planned samples were read."""


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:  # short reads from pipes and sockets
        more = f.read(n - len(data))
        if not more:
            raise TruncatedShard(f"unexpected end of data ({len(data)} of {n} bytes)")
        data += more
    return data


def _skip(f: IO[bytes], n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise TruncatedShard("unexpected end of data while skipping a member")
        n -= len(chunk)


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large sizes
        n = int.from_bytes(field[1:], "big")
        return -n if field[:1] == b"\xff" else n
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> Optional[str]:
    """The 'path' record of a PAX extended header ("LEN path=VALUE\\n" records)."""
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def iter_members(f: IO[bytes], want=lambda name: True) -> Iterator[tuple[str, Optional[bytes]]]:
    """(name, data) of the regular files of a tar stream; data is None when ``want(name)`` is
    false (the bytes are skipped). Raises TruncatedShard on a short or corrupt stream."""
    long_name: Optional[str] = None
    while True:
        hdr = f.read(BLOCK)
        if len(hdr) < BLOCK:
            if not hdr:
                return  # no end-of-archive blocks: tolerated, like tarfile
            hdr += _read_exact(f, BLOCK - len(hdr))
        if hdr.count(0) == BLOCK:
            return  # end-of-archive block
        try:
            chksum = _number(hdr[148:156])
            size = _number(hdr[124:136])
        except ValueError as e:
            raise TruncatedShard(f"corrupt tar header ({e})") from e
        if chksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum field counts as spaces
            raise TruncatedShard("corrupt tar header (bad checksum)")
        kind = hdr[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"L", b"x"):  # the next member's name, GNU or PAX style
            data = _read_exact(f, padded)[:size]
            long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers...
            _skip(f, padded)
            long_name = None
            continue
        name = long_name
        if name is None:
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        long_name = None
        if want(name):
            data = _read_exact(f, padded)
            yield name, data[:size] if padded != size else data
        else:
            _skip(f, padded)
            yield name, None


def iter_raw_samples(fileobj: IO[bytes], shard: str, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
    """Samples ``[start, stop)`` of an open tar stream, as dicts of raw member bytes.

    Raises TruncatedShard if the stream breaks mid-way or ends before ``stop`` samples.
    """
    index, cur_key, cur = -1, None, None
    state = {"index": -1, "key": None}

    def want(name: str) -> bool:
        # decides from the header alone whether to keep a member's bytes
        key = sample_key(name)[0]
        if key != state["key"]:
            state["key"] = key
            state["index"] += 1
        return state["index"] >= start

    try:
        for name, data in iter_members(fileobj, want):
            key, ext = sample_key(name)
            if key != cur_key:
                if cur is not None:
                    yield cur
                    cur = None
                index, cur_key = state["index"], key
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    cur = {"__key__": key, "__shard__": shard}
            if cur is not None and ext:
                cur[ext] = data
        if cur is not None:
            yield cur
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TruncatedShard(f"{type(e).__name__}: {e}") from e
    if stop is not None and index + 1 < stop:
        raise TruncatedShard(f"ended after {index + 1} samples, index.json says at least {stop}")
