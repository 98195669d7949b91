from pathlib import Path as _Path

ACCELERATE_CONFIG_DIR = _Path(__file__).parent / "accelerate_configs"


def accelerate_config(name: str) -> _Path:
    """The path of a shipped accelerate config file by name (e.g. 'zero2'), for --config_file."""
    from ..errors import GentrainError

    path = ACCELERATE_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIG_DIR.glob("*.yaml")))
        raise GentrainError(f"no shipped accelerate config named {name!r}; shipped: {shipped}")
    return path
