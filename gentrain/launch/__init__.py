"""The launcher (`gentrain ...`), its configs and presets, and the shipped accelerate config files."""
from __future__ import annotations

from pathlib import Path

from gentrain.errors import GentrainError

ACCELERATE_CONFIG_DIR = Path(__file__).parent / "accelerate_configs"


def accelerate_config_path(name: str) -> Path:
    """The shipped accelerate config file `name` (e.g. "multi_node"), for `accelerate launch --config_file`."""
    path = ACCELERATE_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIG_DIR.glob("*.yaml")))
        raise GentrainError(f"no shipped accelerate config named {name!r}; shipped: {known}")
    return path
