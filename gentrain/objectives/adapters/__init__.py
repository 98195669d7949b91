"""Pipeline adapters: what a fine-tune needs to know about one diffusers pipeline class, chosen from the
pretrained folder's (or hub id's) model_index.json `_class_name`. The fine-tune objective (finetune.py)
asks the adapter and never names a model; base.py says what an adapter answers."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Optional

from gentrain.errors import GentrainError

# model_index.json _class_name -> "module:class", imported only when chosen
ADAPTERS = {
    "StableDiffusionPipeline": "gentrain.objectives.adapters.sd:SDAdapter",
    "StableDiffusionXLPipeline": "gentrain.objectives.adapters.sdxl:SDXLAdapter",
    "StableDiffusion3Pipeline": "gentrain.objectives.adapters.sd3:SD3Adapter",
    "FluxPipeline": "gentrain.objectives.adapters.flux:FluxAdapter",
    "SanaPipeline": "gentrain.objectives.adapters.sana:SanaAdapter",
    "QwenImagePipeline": "gentrain.objectives.adapters.qwenimage:QwenImageAdapter",
}


def supported() -> list[str]:
    """The classes whose adapter module is present (another may be listed before its module lands)."""
    from importlib.util import find_spec

    return [name for name, ref in ADAPTERS.items() if find_spec(ref.split(":")[0]) is not None]


def adapter_for(class_name: Any, where: str, key: str = "model.pretrained") -> Any:
    """The adapter class serving `class_name`, or one line naming the classes fine-tuning takes."""
    ref = ADAPTERS.get(class_name) if isinstance(class_name, str) else None
    names = supported()
    if ref is None or class_name not in names:
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise GentrainError(f"config key {key!r}: {where!r} is a {class_name}; fine-tuning takes a {listed}")
    module, cls = ref.split(":")
    return getattr(importlib.import_module(module), cls)


def class_name_offline(where: str, revision: Optional[str] = None) -> Optional[str]:
    """The _class_name in a folder's model_index.json, or a hub id's in the local hub cache; None when
    that needs the network (or is unreadable): config validation never downloads."""
    path: Any = Path(where).expanduser() / "model_index.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(where, "model_index.json", revision=revision)
        except Exception:   # not a hub id either (the load later says why)
            return None
    try:
        name = json.loads(Path(path).read_text()).get("_class_name") if isinstance(path, (str, Path)) else None
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _offline_class(where: str, revision: Optional[str]) -> Any:
    """The adapter class of the pipeline at `where` as far as is known offline, else None."""
    name = class_name_offline(where, revision)
    if name not in supported():
        return None
    module, cls = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def needs_size_crop(where: str, revision: Optional[str] = None) -> bool:
    """Whether the pipeline at `where` is conditioned on each image's size and crop (data.size_crop),
    as far as is known offline; the fine-tune sets it again once the pipeline is loaded."""
    cls = _offline_class(where, revision)
    return bool(cls is not None and cls.size_conditioning)


def default_guidance(where: str, revision: Optional[str] = None) -> Optional[float]:
    """The guidance scale the class's pipeline draws with by default (its adapter's `default_guidance`), for
    a folder or a hub id in the local cache; None where the class is not known offline."""
    cls = _offline_class(where, revision)
    return None if cls is None else float(cls.default_guidance)


def load_adapter(m: Any, key: str = "model.pretrained", unload_cached: bool = False) -> Any:
    """The adapter for `m.pretrained` (a folder or hub id at `m.revision`), its pipeline loaded (without the
    adapter's `cache_unloaded` parts with `unload_cached`: a run on cached encodings); one-line errors naming
    the key for a missing folder, an unreadable one, or a class no adapter serves."""
    from diffusers import DiffusionPipeline

    from gentrain.modeling.pretrained import check_pretrained, load_failure

    where = m.pretrained
    check_pretrained(where, key)   # a path that does not exist is never tried as a hub id
    try:
        name = DiffusionPipeline.load_config(where, revision=m.revision).get("_class_name")
    except (OSError, ValueError) as e:
        raise load_failure(key, where, e, "a diffusers pipeline folder or hub id") from None
    cls = adapter_for(name, where, key)
    return cls.load(m, **({part: None for part in cls.cache_unloaded} if unload_cached else {}))
