"""DeepSpeed's own checkpoint files, written so that DeepSpeed's tools read them without extra flags.

gentrain saves each engine under CKPT/deepspeed/NET/ (tag NET). Beside them it writes:
- CKPT/deepspeed/NET/latest holding "." (that folder is the checkpoint itself), so
  `python -m deepspeed.utils.zero_to_fp32 CKPT/deepspeed/NET OUT` needs no `-t`;
- CKPT/deepspeed/latest holding NET where the run has one engine, so `zero_to_fp32 CKPT/deepspeed OUT` works;
- the universal-checkpoint version in each engine's client state, which
  `python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT/deepspeed/NET --output_folder OUT`
  requires (otherwise it asks for --inject_missing_state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from gentrain.checkpoint import DEEPSPEED_LATEST


def save_engines(engines: dict[str, Any], root: Path, exclude_frozen: Callable[[str], bool], main: bool) -> None:
    """Every rank: each engine's checkpoint under root/TAG (its key); the main rank writes the `latest` files."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    for tag, engine in engines.items():
        engine.save_checkpoint(str(root), tag=tag, client_state=info, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen(tag))
        if main:
            (root / tag / DEEPSPEED_LATEST).write_text(".")
    if main and len(engines) == 1:
        (root / DEEPSPEED_LATEST).write_text(next(iter(engines)))
