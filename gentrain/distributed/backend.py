"""The Backend protocol: everything the Trainer asks of a distribution backend, and nothing more.

A backend takes the family's nets and one optimizer per phase, and owns how they are wrapped
(DDP through accelerate, one DeepSpeed engine per phase, FSDP2's ``fully_shard``), how a phase's
step runs (accumulation, gradient synchronisation, clipping, the NaN guard), where the weights
an EMA follows live (whole, or each rank's shard) and how a checkpoint's model and optimizer
files are written and read. ``core.make_backend`` picks one; the Trainer (train/loop.py and
train/state.py) types it as :class:`Backend` and calls only these members.

Implemented by ``ddp.DDPBackend``, ``deepspeed.DeepSpeedBackend`` and ``fsdp2.FSDP2Backend``
(tests/distributed/test_backend_protocol.py checks each against this class, member by member). Methods that
say "collective" must be called by every rank, in the same order.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Backend(Protocol):
    kind: str
    """The checkpoint kind this backend writes ("ddp", "deepspeed", "fsdp2"), saved in trainer_state.json."""
    reads: tuple[str, ...]
    """The checkpoint kinds it resumes natively, its fast path (DDP and FSDP2 write the same files and
    read each other's); every other kind it resumes from the whole weights and optimizer state
    (portable.py), so any gentrain checkpoint resumes under any backend and process count."""
    nets: dict[str, Any]
    """Every net as the family calls it during training (a DDP module, an engine, a sharded module)."""
    raw_nets: dict[str, nn.Module]
    """Every net unwrapped: the module whose parameters the family reads and edits."""
    optimizers: list[torch.optim.Optimizer]
    """One optimizer per phase, in phase order: the one the LR schedule sets (the client optimizer)."""

    # ---- one optimizer step of phase `phase` (its index in the family's phases) -------------------
    def micro_step(self, phase: int, last: bool) -> AbstractContextManager[None]:
        """Around one micro-batch's forward and backward; gradients are synchronised only on the last."""
        ...

    def loss_ok(self, phase: int, loss: Tensor) -> bool:
        """Whether the step may go on with this loss (a backend that steps inside backward decides here)."""
        ...

    def backward(self, phase: int, loss: Tensor, grad_accum: int) -> None:
        """Gradients of one micro-batch's loss (scaled for `grad_accum` micro-batches)."""
        ...

    def step(self, phase: int, params: list[nn.Parameter], loss: Tensor, max_norm: float) -> tuple[Tensor, bool]:
        """Clip to `max_norm` (0: no clipping), guard, step: returns (gradient norm, whether applied).
        The phase's gradients are dropped afterwards, applied or not: the Trainer does not zero
        them before the next phase's micro-batches."""
        ...

    def zero_grad(self, phase: int) -> None:
        """Drop the phase's gradients (after a step that was not applied)."""
        ...

    def weight_tensors(self, name: str) -> list[Tensor]:
        """Every tensor holding net `name`'s weights, for an in-place elementwise edit after a step."""
        ...

    # ---- EMA, sampling, checkpoints --------------------------------------------------------------
    def ema_params(self, name: str) -> list[Tensor]:
        """The tensors an EMA of net `name` follows (this rank's share where the weights are sharded)."""
        ...

    def full_ema(self, name: str, shadow: list[Tensor]) -> dict[str, Tensor]:
        """Collective: the whole EMA of net `name`, by parameter name, from this rank's `shadow`."""
        ...

    def local_ema(self, name: str, full: dict[str, Tensor]) -> list[Tensor]:
        """This rank's share of a whole EMA (`full_ema`'s inverse), laid out as `ema_params`."""
        ...

    def sampling_nets(self, main: bool, ema: dict[str, dict[str, Tensor]]) -> AbstractContextManager[dict[str, nn.Module]]:
        """Collective: whole nets in eval mode with the EMA weights swapped in (on the main process;
        the others get an empty dict), restored afterwards."""
        ...

    def save(self, path: Path) -> None:
        """Every rank: the nets' weights and the optimizers' state into checkpoint folder `path`."""
        ...

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        """Every rank: what `save` wrote (`saved`: the checkpoint's trainer state, whose "backend" names
        the kind that wrote it), or another backend's checkpoint from its whole files; any process count."""
        ...
