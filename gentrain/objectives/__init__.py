"""Model families by name: ``model.family`` in a config picks one."""
from __future__ import annotations

import importlib
from typing import Any

from gentrain.errors import GentrainError
from gentrain.objectives.base import BatchRNG, Objective, OptimizerSpec, Phase, Runtime

# family -> "module:Class"; imported lazily so `--help` and `--dry-run` stay fast
FAMILIES: dict[str, str] = {
    "flow": "gentrain.objectives.flow:FlowMatchingObjective",
    "diffusion": "gentrain.objectives.diffusion:DiffusionObjective",
    "vae": "gentrain.objectives.autoencoding:AutoencoderObjective",
    "vqvae": "gentrain.objectives.autoencoding:AutoencoderObjective",
    "gan": "gentrain.objectives.adversarial:GANObjective",
    "pix2pix": "gentrain.objectives.image2image:Pix2PixObjective",
    "cyclegan": "gentrain.objectives.image2image:CycleGANObjective",
    "finetune": "gentrain.objectives.finetune:FinetuneObjective",
}


def family_class(name: str) -> type[Objective]:
    if name not in FAMILIES:
        raise GentrainError(f"config key 'model.family': {name!r} is not a known family; choose one of {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_config(name: str) -> type:
    return family_class(name).Config


def build_objective(cfg: Any) -> Objective:
    return family_class(cfg.model.family).from_config(cfg)


__all__ = ["FAMILIES", "BatchRNG", "Objective", "OptimizerSpec", "Phase", "Runtime", "build_objective", "family_class", "family_config"]
