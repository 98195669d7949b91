"""A pretrained part named by a config key: a local folder or a Hugging Face hub id.

A value that names a path (``./x``, ``../x``, ``/x``, ``~/x``, more than ``ORG/NAME``, or a
folder inside one that exists, e.g. ``exports/x`` beside an ``exports/``) and does not exist is
refused at once, instead of being tried as a hub id (whose lookups retry for half a minute
offline). Hub lookups honour ``HF_HUB_OFFLINE``; a failed one says how to set it.
"""
from __future__ import annotations

import os
from pathlib import Path

from gentrain.errors import GentrainError

OFFLINE_HINT = "offline? `export HF_HUB_OFFLINE=1` makes hub lookups use the local cache only, without retries"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(value: str) -> bool:
    """Whether `value` can only be meant as a local path (a hub id is NAME or ORG/NAME)."""
    if value.startswith((".", "/", "~")) or value.endswith("/") or "\\" in value:
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _where(key: str) -> str:
    """'config key 'model.x'' for a config key, the flag itself for a command-line option ('--text-encoder')."""
    return key if key.startswith("--") else f"config key {key!r}"


def check_pretrained(value: str, key: str, what: str = "folder") -> None:
    """One line when `value` names a local path that does not exist (or is a file, not a folder)."""
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise GentrainError(f"{_where(key)}: {value!r} is a file, not a {what}")
        return
    if looks_like_path(value):
        raise GentrainError(f"{_where(key)}: {value!r} does not exist, so it is not a {what} (named as a local "
                            "path, it is not tried as a hub id ORG/NAME)")


def load_failure(key: str, value: str, e: BaseException, what: str) -> GentrainError:
    """The one-line error for a part that did not load, with the offline hint where it was a hub id."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if Path(value).expanduser().exists():
        hint = ""
    elif hub_offline():
        hint = "; HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched"
    else:
        hint = f"; {OFFLINE_HINT}"
    return GentrainError(f"{_where(key)}: {value!r} is not {what} ({first}){hint}")
