"""Pipeline adapters: what a fine-tune needs to know about one diffusers pipeline class, chosen from the
pretrained folder's (or hub id's) model_index.json `_class_name`. The fine-tune objective (finetune.py)
asks the adapter and never names a model; base.py says what an adapter answers."""
from __future__ import annotations

import importlib
from typing import Any

from gentrain.errors import GentrainError

# model_index.json _class_name -> "module:class", imported only when chosen
ADAPTERS = {
    "StableDiffusionPipeline": "gentrain.objectives.adapters.sd:SDAdapter",
    "StableDiffusionXLPipeline": "gentrain.objectives.adapters.sdxl:SDXLAdapter",
    "StableDiffusion3Pipeline": "gentrain.objectives.adapters.sd3:SD3Adapter",
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


def load_adapter(m: Any) -> Any:
    """The adapter for `m.pretrained` (a folder or hub id at `m.revision`), its pipeline loaded; one-line
    errors naming the key for a missing folder, an unreadable one, or a class no adapter serves."""
    from diffusers import DiffusionPipeline

    from gentrain.modeling.pretrained import check_pretrained, load_failure

    where = m.pretrained
    check_pretrained(where, "model.pretrained")   # a path that does not exist is never tried as a hub id
    try:
        name = DiffusionPipeline.load_config(where, revision=m.revision).get("_class_name")
    except (OSError, ValueError) as e:
        raise load_failure("model.pretrained", where, e, "a diffusers pipeline folder or hub id") from None
    return adapter_for(name, where).load(m)
