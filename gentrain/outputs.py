"""Where a command writes: its output path checked before any work, and what a failed invocation
created removed again (never anything that was there before it started)."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from gentrain.errors import GentrainError


def check_out(path: str | Path, *, folder: bool = True, flag: str = "--out") -> None:
    """One line when `path` cannot be the output: a folder named where a file is (or the reverse),
    or a path under an existing file."""
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise GentrainError(f"{flag} {path}: is an existing file, not a folder; name a new folder")
        if not folder and p.is_dir():
            raise GentrainError(f"{flag} {path}: is a folder; name a file, e.g. {Path(path) / 'out.png'}")
        return
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise GentrainError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def first_missing(path: str | Path) -> Optional[Path]:
    """The outermost folder of `path` that does not exist yet (what creating `path` would create)."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        return None
    top = p
    for parent in p.parents:
        if parent.exists():
            break
        top = parent
    return top


@contextmanager
def removed_on_failure(path: str | Path, *, new_entries: bool = False) -> Iterator[None]:
    """Run the body; if it raises, remove the folders it created for `path` (those that did not
    exist when it started), so a failed command leaves nothing behind. With `new_entries`, a `path`
    that existed loses the entries the body added to it (never one that was there before)."""
    top = first_missing(path)
    p = Path(path).expanduser()
    before = {e.name for e in p.iterdir()} if new_entries and top is None and p.is_dir() else None
    try:
        yield
    except BaseException:
        if top is not None and top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        for entry in (p.iterdir() if before is not None else ()):
            if entry.name not in before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        raise
