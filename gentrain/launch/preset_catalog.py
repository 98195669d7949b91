"""`gentrain presets`: every shipped preset with its family, its data and a one-line purpose.

The purpose is the first sentence of the preset file's leading comment, so presets keep only
config keys; the family and data come from the YAML itself (read with safe_load, as configs are).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gentrain.errors import GentrainError
from gentrain.config import PRESET_DIR, _read_yaml, list_presets

PURPOSE_MAX = 120  # characters: a longer first sentence is cut at a clause boundary


@dataclass(frozen=True)
class PresetInfo:
    name: str
    family: str
    data: str
    purpose: str


def leading_comment(text: str) -> str:
    """The file's first comment lines joined, up to its first key or indented example command."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("  ") and words:  # "#   gentrain data build ...": an example, not prose
            break
        words.append(body.strip())
    return " ".join(w for w in words if w)


def _depth0(text: str) -> list[tuple[int, str]]:
    """(index, char) of the characters of `text` outside brackets and quotes."""
    out, depth, quoted = [], 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch in "([" and not quoted:
            depth += 1
        elif ch in ")]" and not quoted:
            depth = max(0, depth - 1)
        elif depth == 0 and not quoted:
            out.append((i, ch))
    return out


def first_sentence(text: str, limit: int = PURPOSE_MAX) -> str:
    """The first sentence (to '. ', ';' or ':' outside brackets; a ':' after under 40 characters is
    read on), cut back to its last top-level ', ' or first ' (' when longer than `limit`."""
    top = _depth0(text)
    end = len(text)
    for i, ch in top:
        if ch == ";" or (ch == ":" and i >= 40) or (ch == "." and text[i + 1:i + 2] in ("", " ")
                                                    and not re.search(r"\b(al|e\.g|i\.e)$", text[:i])):
            end = i
            break
    s = text[:end].strip()
    if len(s) <= limit:
        return s
    commas = [i for i, ch in top if ch == "," and i < limit and text[i + 1:i + 2] == " "]
    if commas:
        return s[:commas[-1]]
    paren = next((i for i, ch in top if text[i:i + 2] == " ("), None)
    return s[:paren] if paren else s[:limit].rsplit(" ", 1)[0] + " ..."


def _data(cfg: dict) -> str:
    d = cfg.get("data") or {}
    if d.get("datasets"):
        return "mix: " + ", ".join(str(x.get("name") or x.get("shards")) for x in d["datasets"])
    if d.get("source") == "toy2d":
        return f"toy2d: {d.get('toy2d')}"
    return f"shards: {d.get('shards')}"


def preset_info(name: str) -> PresetInfo:
    path: Path = PRESET_DIR / f"{name}.yaml"
    cfg = _read_yaml(path)
    return PresetInfo(name=name, family=str((cfg.get("model") or {}).get("family")), data=_data(cfg),
                      purpose=first_sentence(leading_comment(path.read_text())))


def run_presets(args) -> int:
    infos = [preset_info(n) for n in list_presets()]
    if args.family:
        families = sorted({p.family for p in infos})
        infos = [p for p in infos if p.family == args.family]
        if not infos:
            raise GentrainError(f"no shipped preset has model.family {args.family!r}; families: {', '.join(families)}")
    w = [max(len(getattr(p, k)) for p in infos) if infos else 0 for k in ("name", "family", "data")]
    for p in infos:
        print(f"{p.name:<{w[0]}}  {p.family:<{w[1]}}  {p.data:<{w[2]}}  {p.purpose}")
    return 0
