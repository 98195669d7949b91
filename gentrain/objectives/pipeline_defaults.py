"""What a fine-tune takes from its base pipeline where the base records it, rather than from a
preset written for another base (SD-1.5's guidance 7.5 would be far too strong for a gentrain
export sampled at 3)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from gentrain.objectives.adapters import default_guidance

SD_GUIDANCE = 7.5   # diffusers' StableDiffusionPipeline.__call__ default, what SD-1.x/2.x are sampled at
EXPORT_RECORD = "gentrain_export.json"   # written beside a gentrain export (train/export.py)


def base_guidance(pretrained: str, revision: Optional[str] = None) -> float:
    """The classifier-free guidance scale the base was trained and evaluated with, as its gentrain
    export recorded it (a local folder's gentrain_export.json); else its pipeline class's default,
    the adapter's `default_guidance` (SD 7.5, SDXL 5.0, SD3 7.0: each class's __call__ default), for a
    folder or a hub id in the local hub cache; else diffusers' SD default 7.5."""
    record = Path(pretrained).expanduser() / EXPORT_RECORD
    try:
        scale = json.loads(record.read_text()).get("guidance_scale") if record.is_file() else None
    except (OSError, ValueError, AttributeError):
        scale = None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        return float(scale)
    default = default_guidance(pretrained, revision)
    return SD_GUIDANCE if default is None else default
