"""Per-phase optimizers and LR schedules, built from a phase's `OptimizerSpec` and train.* defaults.

Every schedule is a function of the training step (the loop's step, e.g. the generator step of a
GAN), whichever phase it drives: a critic that steps 5 times per training step decays on the same
clock as its generator.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from gentrain.errors import GentrainError
from gentrain.objectives.base import Phase

OPTIMIZERS = ("adam", "adamw", "adamw8bit", "rmsprop")


def _adamw8bit() -> Any:
    """bitsandbytes' AdamW8bit (Dettmers et al. 2022), or None with one line when it does not import."""
    try:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    except Exception as e:  # noqa: BLE001 - not installed, or no usable backend on this machine
        print(f"gentrain: optimizer adamw8bit needs bitsandbytes, which does not import here "
              f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); using torch AdamW", file=sys.stderr)
        return None


def phase_lr(phase: Phase, train_cfg: Any) -> float:
    return phase.optimizer.lr or train_cfg.lr


def build_optimizer(phase: Phase, params: list[torch.nn.Parameter], train_cfg: Any) -> torch.optim.Optimizer:
    spec, t = phase.optimizer, train_cfg
    lr = phase_lr(phase, t)
    wd = t.weight_decay if spec.weight_decay is None else spec.weight_decay
    betas = tuple(t.betas if spec.betas is None else spec.betas)
    fused = {"fused": True} if getattr(t, "fused_optimizer", False) else {}
    if fused and spec.name not in ("adam", "adamw"):
        raise GentrainError(f"config key 'train.fused_optimizer': phase {phase.name!r} uses {spec.name!r}, which has "
                            "no fused kernel in torch (fused: adam, adamw)")
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd, **fused)
    if spec.name == "adamw8bit" and (cls := _adamw8bit()) is not None:
        return cls(params, lr=lr, betas=betas, weight_decay=wd)
    if spec.name in ("adamw", "adamw8bit"):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, **fused)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    raise GentrainError(f"phase {phase.name!r}: optimizer {spec.name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")


def build_schedule(phase: Phase, optimizer: torch.optim.Optimizer, train_cfg: Any):
    """diffusers' schedules by name over train.max_steps, or "constant_then_linear" (Pix2Pix /
    CycleGAN: the base lr for `constant_steps`, then linearly to 0 at max_steps)."""
    spec, t = phase.optimizer, train_cfg
    name = spec.schedule or t.lr_schedule
    if name == "constant_then_linear":
        hold, total = spec.constant_steps, t.max_steps
        if not 0 <= hold < total:
            raise GentrainError(f"phase {phase.name!r}: constant_steps={hold} must be in [0, train.max_steps={total})")
        return LambdaLR(optimizer, lambda s: 1.0 if s < hold else max(0.0, (total - s) / (total - hold)))
    if name == "constant" and t.warmup_steps:   # diffusers' constant ignores warmup: train.warmup_steps applies
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
