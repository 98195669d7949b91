"""The narrow interface between the one training loop and a model family.

A family owns its trainable nets (by name), its phases (one optimizer each) and its loss; the loop
owns everything else (accumulation, clipping, precision, EMA, NaN guard, logging, checkpoints).
The loop replaces the entries of ``nets`` with their distributed wrappers after
``accelerator.prepare``, so ``loss`` must reach its nets through ``self.nets``, and sets ``rng``,
through which ``loss`` makes every per-sample random draw (noise, timesteps, dropout masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gentrain.maths.rng import BatchRNG  # noqa: F401 - re-exported: families draw through it


@dataclass(frozen=True)
class OptimizerSpec:
    """A phase's optimizer and LR schedule; every None falls back to the train.* key of that name."""

    name: str = "adamw"                        # adam | adamw | rmsprop
    lr: float | None = None                    # train.lr
    betas: tuple[float, float] | None = None   # adam/adamw: train.betas
    weight_decay: float | None = None          # train.weight_decay
    schedule: str | None = None                # train.lr_schedule, or "constant_then_linear"
    constant_steps: int = 0                    # constant_then_linear: base lr for these steps, then linear to 0


@dataclass(frozen=True)
class Phase:
    """One optimizer step's worth of work: which nets it updates, how often, how many times."""

    name: str
    nets: tuple[str, ...]
    every: int = 1      # run on steps where step % every == 0
    repeat: int = 1     # optimizer steps per run (e.g. WGAN critic: 5), each on a fresh batch
    start: int = 0      # first step on which the phase runs (e.g. a discriminator's warm start)
    optimizer: OptimizerSpec = OptimizerSpec()


class Objective:
    """Base class of every family. Subclasses set ``nets`` and implement ``loss`` and ``sample``."""

    nets: dict[str, nn.Module]
    ema_nets: tuple[str, ...] = ()   # nets whose EMA is kept (and used for sampling/export)
    partial_nets: tuple[str, ...] = ()  # nets saved/averaged by trainable parameters only (adapters on a frozen base)
    data_key: str = "image"          # the batch key whose first dim counts images
    preview_count: int = 16          # samples drawn for a preview image
    preview_nrow: int | None = None  # images per row of the preview grid (None: square)
    preview_captions: list[str] | None = None  # written under the preview grid (e.g. the prompts)
    step: int = 0                    # the current training step, set by the loop before each step
    rng: BatchRNG = BatchRNG()       # per-sample training draws; the loop sets this rank's
    # the nets without their DDP / DeepSpeed wrapper (the loop sets them): for a forward whose input
    # gradient a loss takes (a penalty's autograd.grad), which must not run a wrapper's backward hooks
    plain_nets: dict[str, nn.Module] = {}
    paired_image: str | None = None  # the second image each sample carries for the loss (decode.EXTRA_IMAGES)

    def phases(self) -> list[Phase]:
        return [Phase("main", tuple(self.nets))]

    @property
    def exports_folder(self) -> bool:
        """Whether `gentrain export` calls the family's own `export` (a diffusers-format folder);
        else the nets' weights are written as plain safetensors. By default: image models with one."""
        return hasattr(self, "export") and self.data_key == "image"

    def repeats(self, phase: Phase, step: int) -> int:
        """Optimizer steps of `phase` at training step `step` (WGAN's critic bursts override it)."""
        return phase.repeat

    def after_step(self, phase: str) -> None:
        """Called after each applied optimizer step of `phase` (e.g. WGAN's weight clipping, which edits
        `weight_tensors(net)`)."""

    def weight_tensors(self, name: str) -> list[Tensor]:
        """Every tensor holding net `name`'s weights, for an in-place elementwise edit: its parameters;
        under DeepSpeed also the optimizer's fp32 master copy (the loop sets the backend's)."""
        return list(self.nets[name].parameters())

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's family state beyond nets and optimizers (e.g. CycleGAN's image pool), as
        tensors: saved in every checkpoint, restored on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint has {sorted(state)}")

    @property
    def zero3_problem(self) -> str | None:
        """Why this family cannot train under ZeRO-3 (every parameter partitioned across ranks and
        whole only inside a net's forward/backward), or None when it can."""
        return None

    def zero_problem(self, stage: int) -> str | None:
        """Why this family cannot train under DeepSpeed ZeRO stage `stage`, or None when it can."""
        return self.zero3_problem if stage == 3 else None

    def loss(self, phase: str, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, cond: dict | None = None, *, generator: torch.Generator | None = None,
               **kw: Any) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, generator: torch.Generator | None = None) -> Tensor:
        """What the preview image shows; by default `preview_count` samples."""
        return self.sample(self.preview_count, generator=generator)

    def to(self, device: torch.device) -> "Objective":
        """Move nets and any frozen helpers to the device."""
        for name, net in self.nets.items():
            self.nets[name] = net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.nets.values())).parameters().__next__().device

    def batch_size(self, batch: dict[str, Any]) -> int:
        return int(batch[self.data_key].shape[0])
