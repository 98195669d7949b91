"""The narrow interface between the one training loop and a model family.

A family owns its trainable nets (by name), its phases (one optimizer each) and its loss; the loop
owns everything else (accumulation, clipping, precision, EMA, NaN guard, logging, checkpoints).
The loop replaces the entries of ``nets`` with their distributed wrappers after
``accelerator.prepare``, so ``loss`` must reach its nets through ``self.nets``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Phase:
    """One optimizer step's worth of work: which nets it updates, how often, how many times."""

    name: str
    nets: tuple[str, ...]
    every: int = 1      # run on steps where step % every == 0
    repeat: int = 1     # optimizer steps per run (e.g. WGAN critic: 5), each on a fresh batch
    lr: float | None = None  # None: train.lr
    start: int = 0      # first step on which the phase runs (e.g. a discriminator's warm start)


class Objective:
    """Base class of every family. Subclasses set ``nets`` and implement ``loss`` and ``sample``."""

    nets: dict[str, nn.Module]
    ema_nets: tuple[str, ...] = ()   # nets whose EMA is kept (and used for sampling/export)
    data_key: str = "image"          # the batch key whose first dim counts images
    preview_count: int = 16          # samples drawn for a preview image
    preview_nrow: int | None = None  # images per row of the preview grid (None: square)
    preview_captions: list[str] | None = None  # written under the preview grid (e.g. the prompts)
    step: int = 0                    # the current training step, set by the loop before each step

    def phases(self) -> list[Phase]:
        return [Phase("main", tuple(self.nets))]

    @property
    def zero3_problem(self) -> str | None:
        """Why this family cannot train under ZeRO-3 (every parameter partitioned across ranks and
        whole only inside a net's forward/backward), or None when it can."""
        return None

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
