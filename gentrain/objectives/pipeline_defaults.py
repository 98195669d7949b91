"""What a fine-tune takes from its base pipeline where the base records it, rather than from a
preset written for another base (SD-1.5's guidance 7.5 would be far too strong for a gentrain
export sampled at 3)."""
from __future__ import annotations

import json
from pathlib import Path

SD_GUIDANCE = 7.5   # diffusers' StableDiffusionPipeline.__call__ default, what SD-1.x/2.x are sampled at
EXPORT_RECORD = "gentrain_export.json"   # written beside a gentrain export (train/export.py)


def base_guidance(pretrained: str) -> float:
    """The classifier-free guidance scale the base was trained and evaluated with, as its gentrain
    export recorded it (a local folder's gentrain_export.json); else diffusers' default 7.5."""
    record = Path(pretrained).expanduser() / EXPORT_RECORD
    try:
        scale = json.loads(record.read_text()).get("guidance_scale") if record.is_file() else None
    except (OSError, ValueError, AttributeError):
        scale = None
    return float(scale) if isinstance(scale, (int, float)) and scale > 0 else SD_GUIDANCE
