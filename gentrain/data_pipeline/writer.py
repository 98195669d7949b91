"""Write WebDataset tar shards atomically, with an ``index.json`` describing the shard set.

A sample is a dict ``{"__key__": str, "<ext>": bytes | str, ...}`` whose values are already
encoded (PNG bytes, UTF-8 caption, JSON text, ``.npy`` bytes): the writer never pickles. Each
shard is written under a temporary name and renamed when complete, so a half-written shard is
never left under its final name; ``index.json`` is written (the same way) last.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from typing import Any, Iterable, Optional

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from gentrain.errors import DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = "gentrain-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
MEMBER_OVERHEAD = 1024  # tar header + padding per member, for the byte budget


class BadImage(DataError):
    """An image whose header PIL cannot read, named by the user's file where the source knows it."""


def _unreadable(key: str, origin: Optional[str], member: str, e: Exception) -> BadImage:
    reason = "not an image format PIL recognises" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0]
    where = f"image file {origin}" if origin else f"sample {key!r}: its {member} member"
    return BadImage(f"{where} is not a readable image ({reason})")


def _image_size(key: str, sample: dict[str, Any], strict: bool, origin: Optional[str] = None) -> Optional[str]:
    """'WxH' of the sample's image, read from its header (not decoded). With ``strict`` the
    headers of extra image members (``input.png``, ``b.png``, ...) are checked too."""
    if strict:
        for member, data in sample.items():
            name, _, ext = member.rpartition(".")
            if name and ext in IMAGE_EXTS:
                try:
                    with Image.open(io.BytesIO(data)):
                        pass
                except Exception as e:
                    raise _unreadable(key, None, member, e) from e
    for ext in IMAGE_EXTS:
        if ext in sample:
            try:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    return f"{im.width}x{im.height}"
            except Exception as e:
                if strict:
                    raise _unreadable(key, origin, ext, e) from e
                return "unreadable"
    return None


def _atomic_write_text(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardSetWriter:
    """Writes samples into ``out_dir/{000000..}.tar``; a new shard starts when the current one
    holds ``max_samples`` samples or would exceed ``max_bytes``. With ``check_images`` an image
    whose header PIL cannot read is refused (BadImage, naming the sample's ``__origin__`` file where
    it has one), or with ``bad_image="skip"`` left out and listed in the index's ``skipped``."""

    def __init__(self, out_dir: str, *, max_samples: int = 1000, max_bytes: Optional[int] = None,
                 source: str = "", name_format: str = "{:06d}.tar", check_images: bool = True,
                 bad_image: str = "fail"):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir, self.max_samples, self.max_bytes = out_dir, max_samples, max_bytes
        self.source, self.name_format, self.check_images = source, name_format, check_images
        self.bad_image, self.skipped = bad_image, []
        os.makedirs(out_dir, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.image_sizes: Counter[str] = Counter()
        self.keys: set[str] = set()
        self._tar: Optional[wds.TarWriter] = None
        self._file = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = self.name_format.format(len(self.shards))
        self._name, self._tmp = name, os.path.join(self.out_dir, f".{name}.tmp")
        self._file = open(self._tmp, "wb")
        # encoder=False: values must already be bytes/str, nothing is pickled; mtime fixed so the
        # same samples give byte-identical shards
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)  # int: a float adds a PAX header per member
        self._count = self._bytes = 0

    def end_shard(self) -> None:
        """Finish the current shard (the next sample starts a new one)."""
        if self._tar is None:
            return
        self._tar.close()  # closes the file too
        os.replace(self._tmp, os.path.join(self.out_dir, self._name))
        self.shards.append({"name": self._name, "samples": self._count,
                            "bytes": os.path.getsize(os.path.join(self.out_dir, self._name))})
        self._tar = None

    def write(self, sample: dict[str, Any]) -> None:
        key = sample.get("__key__")
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise DataError(f"sample key {key!r}: keys must be non-empty and contain no '.' (WebDataset splits on it)")
        if key in self.keys:
            raise DataError(f"sample key {key!r} appears twice in the shard set")
        # members as stored; "__origin__" (the user's file, for messages) is not one
        encoded = {k: (v.encode("utf-8") if isinstance(v, str) else v) for k, v in sample.items() if not k.startswith("__")}
        try:
            wh = _image_size(key, encoded, self.check_images, sample.get("__origin__"))
        except BadImage as e:
            if self.bad_image != "skip":
                raise BadImage(f"{e}; --bad-image skip leaves such images out") from None
            self.skipped.append(str(e))
            return
        self.keys.add(key)
        size = sum(len(v) + MEMBER_OVERHEAD for v in encoded.values())
        full = self._tar is not None and (self._count >= self.max_samples or (
            self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes))
        if full:
            self.end_shard()
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": key, **encoded})
        self._count += 1
        self._bytes += size
        if wh:
            self.image_sizes[wh] += 1

    def close(self) -> dict[str, Any]:
        """Finish the last shard, write ``index.json`` and return the index."""
        self.end_shard()
        index = {
            "format": INDEX_FORMAT,
            "source": self.source,
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
            "image_sizes": dict(sorted(self.image_sizes.items())),
            **({"skipped": self.skipped} if self.skipped else {}),   # bad images left out (bad_image="skip")
        }
        _atomic_write_text(os.path.join(self.out_dir, INDEX_NAME), json.dumps(index, indent=1) + "\n")
        return index

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.unlink(self._tmp)
            self._tar = None


def write_shards(samples: Iterable[dict[str, Any]], out_dir: str, *, max_samples: int = 1000,
                 max_bytes: Optional[int] = None, source: str = "", bad_image: str = "fail") -> dict[str, Any]:
    """Write encoded samples into tar shards under ``out_dir`` and return the index written to
    ``out_dir/index.json`` (shard names, sample counts, byte sizes, image sizes, source; bad
    images skipped under ``bad_image="skip"``)."""
    writer = ShardSetWriter(out_dir, max_samples=max_samples, max_bytes=max_bytes, source=source, bad_image=bad_image)
    try:
        for s in samples:
            writer.write(s)
    except BaseException:
        writer.abort()  # the temp file goes; complete shards stay, but no index.json is written
        raise
    return writer.close()
