"""The narrow interface between the one training loop and a model family.

A family owns its trainable nets (by name), its phases (one optimizer each) and its loss; the loop
owns everything else (accumulation, clipping, precision, EMA, NaN guard, logging, checkpoints).

What a family declares (class attributes or properties, with defaults here) is all the loop, the
CLI, export and eval ask of it: nobody probes a family with getattr or writes into it, except

- ``nets``: the loop replaces its entries with their distributed wrappers after set-up (a frozen
  net unwrapped during another net's phase, the EMA weights while sampling), so ``loss`` must reach
  its nets through ``self.nets``;
- ``bind(runtime)``: the one hand-over of what only the Trainer knows (:class:`Runtime`: this
  rank's per-sample RNG, the step, the unwrapped nets, the backend's weight tensors). A family reads
  them through ``self.rng``, ``self.step``, ``self.plain_nets`` and ``self.weight_tensors``; an
  objective never bound (sampling, export, eval, tests) reads a default Runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.maths.rng import BatchRNG
from gentrain.objectives.conditioning import NoConditioning


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


@dataclass
class Runtime:
    """What the Trainer hands a family (``Objective.bind``), and only the Trainer knows."""

    # this rank's rows of the one training stream: every per-sample draw of `loss` (noise, timesteps,
    # dropout masks) goes through it, so a step draws alike on any process count (BatchRNG)
    rng: BatchRNG = field(default_factory=BatchRNG)
    # the training step being run; the Trainer advances it before each step (KL warm-up, a GAN
    # term's start, lazy R1's cadence, a fine-tune's base preview read it)
    step: int = 0
    # the nets without their DDP / DeepSpeed wrapper: for a forward whose input gradient a loss takes
    # (a penalty's autograd.grad), which must not run a wrapper's backward hooks
    plain_nets: dict[str, nn.Module] = field(default_factory=dict)
    # every tensor holding a net's weights, for an in-place elementwise edit (WGAN's clipping): the
    # backend's, which under DeepSpeed adds the optimizer's fp32 master copy; None: the parameters
    weight_tensors: Callable[[str], list[Tensor]] | None = None


class Objective:
    """Base class of every family. Subclasses set ``nets`` and implement ``loss`` and ``sample``."""

    nets: dict[str, nn.Module]
    ema_nets: tuple[str, ...] = ()   # nets whose EMA is kept (and used for sampling/export)
    partial_nets: tuple[str, ...] = ()  # nets saved/averaged by trainable parameters only (adapters on a frozen base)
    # nets a loss differentiates twice through in the phases that train them (a penalty's autograd.grad with
    # create_graph=True, then the backward): FSDP2 keeps their weights gathered through each such step
    twice_differentiated: tuple[str, ...] = ()
    data_key: str = "image"          # the batch key whose first dim counts images
    paired_image: str | None = None  # the second image each sample carries for the loss (decode.EXTRA_IMAGES)
    preview_count: int = 16          # samples drawn for a preview image
    preview_nrow: int | None = None  # images per row of the preview grid (None: square)
    preview_captions: list[str] | None = None  # written under the preview grid (e.g. the prompts)
    preview_at_start: bool = False   # a preview before the first step too (a fine-tune's base model)
    # what samples are conditioned on: its `kind` (none | class | text | image) tells the CLI which
    # of --prompt/--label/--input apply, eval which prompts to score (conditioning.py)
    conditioning: Any = NoConditioning()
    guidance_scale: float | None = None  # classifier-free guidance at sampling; None: the family has none
    # what the family can be scored on: names of gentrain.eval.metrics.EVALUATORS, run in order and merged
    evaluates: tuple[str, ...] = ()

    # ---- the Trainer's hand-over ---------------------------------------------------------------
    def bind(self, runtime: Runtime) -> None:
        """Called once by the Trainer when the nets are placed; it keeps `runtime` and advances its step."""
        self._runtime = runtime

    @property
    def runtime(self) -> Runtime:
        try:
            return self._runtime
        except AttributeError:   # not trained here (sampling, export, eval, a test): rank 0 of 1, step 0
            self._runtime = Runtime()
            return self._runtime

    @property
    def rng(self) -> BatchRNG:
        return self.runtime.rng

    @property
    def step(self) -> int:
        return self.runtime.step

    @step.setter
    def step(self, value: int) -> None:
        """For tools that drive a family outside the Trainer (the memory plan runs every term at once)."""
        self.runtime.step = value

    @property
    def plain_nets(self) -> dict[str, nn.Module]:
        return self.runtime.plain_nets

    def weight_tensors(self, name: str) -> list[Tensor]:
        """Every tensor holding net `name`'s weights, for an in-place elementwise edit (Runtime.weight_tensors)."""
        given = self.runtime.weight_tensors
        return given(name) if given is not None else list(self.nets[name].parameters())

    def phases(self) -> list[Phase]:
        return [Phase("main", tuple(self.nets))]

    @property
    def exports_folder(self) -> bool:
        """Whether `gentrain export` calls the family's own `export` (a diffusers-format folder);
        else the nets' weights are written as plain safetensors. By default: image models."""
        return self.data_key == "image"

    def export(self, out: Path, cfg: Any, batches: Iterator[dict]) -> dict[str, Any]:
        """Write the family's own folder format into `out` (when `exports_folder`); returns what
        export.json records beside it."""
        raise GentrainError(f"{type(self).__name__} has no folder export; its weights export as safetensors")

    def repeats(self, phase: Phase, step: int) -> int:
        """Optimizer steps of `phase` at training step `step` (WGAN's critic bursts override it)."""
        return phase.repeat

    def after_step(self, phase: str) -> None:
        """Called after each applied optimizer step of `phase` (e.g. WGAN's weight clipping, which edits
        `weight_tensors(net)`)."""

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

    def fsdp_problem(self) -> str | None:
        """Why this family cannot train under FSDP2, or None when it can: what ZeRO-3 cannot (FSDP2 too
        gathers a block's weights only inside its forward and backward), but a double backward through
        the nets of `twice_differentiated`, which FSDP2 keeps gathered through their phase's step."""
        return self.zero3_problem

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

    def validation(self) -> dict[str, float]:
        """Figures logged beside each preview (a fine-tune's held-out loss); none by default."""
        return {}

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
