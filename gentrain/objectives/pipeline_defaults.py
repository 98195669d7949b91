"""What a fine-tune takes from its base pipeline where the base records it, rather than from a
preset written for another base (SD-1.5's guidance 7.5 would be far too strong for a gentrain
export sampled at 3)."""
from __future__ import annotations

import json
from pathlib import Path

SD_GUIDANCE = 7.5   # diffusers' StableDiffusionPipeline.__call__ default, what SD-1.x/2.x are sampled at
# other classes' __call__ defaults, read from the folder's model_index.json
CLASS_GUIDANCE = {"StableDiffusion3Pipeline": 7.0, "FluxPipeline": 3.5, "SanaPipeline": 4.5,
                  "QwenImagePipeline": 4.0}   # Qwen-Image: its true_cfg_scale
EXPORT_RECORD = "gentrain_export.json"   # written beside a gentrain export (train/export.py)


def base_guidance(pretrained: str) -> float:
    """The classifier-free guidance scale the base was trained and evaluated with, as its gentrain
    export recorded it (a local folder's gentrain_export.json); else its pipeline class's default
    (a local folder's model_index.json: SD3's 7.0); else diffusers' SD default 7.5."""
    folder = Path(pretrained).expanduser()
    try:
        record = folder / EXPORT_RECORD
        scale = json.loads(record.read_text()).get("guidance_scale") if record.is_file() else None
        index = folder / "model_index.json"
        name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (OSError, ValueError, AttributeError):
        scale = name = None
    if isinstance(scale, (int, float)) and scale > 0:
        return float(scale)
    return CLASS_GUIDANCE.get(name, SD_GUIDANCE) if isinstance(name, str) else SD_GUIDANCE
