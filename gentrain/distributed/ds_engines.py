"""What DeepSpeed engines are built from: one module per optimizer, its optimizer, its process groups.

Each phase gets its own ``deepspeed.initialize`` engine. A phase that trains several nets with
one optimizer (CycleGAN's two generators, its two discriminators) gets one engine over a
:class:`NetGroup` of them, each net called through it by name (:class:`GroupMember`). Optimizer
offload swaps in DeepSpeedCPUAdam; the forward runs under autocast as accelerate does for DDP;
every process group DeepSpeed makes times out as the default group does.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from gentrain.errors import GentrainError


def offload_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same Adam/AdamW as DeepSpeedCPUAdam, the optimizer DeepSpeed's offload is built for."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise GentrainError(f"optimizer offload supports Adam/AdamW only, not {type(opt).__name__}")
    g = opt.param_groups[0]
    params = [p for group in opt.param_groups for p in group["params"]]
    return DeepSpeedCPUAdam(params, lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                            adamw_mode=isinstance(opt, torch.optim.AdamW))


def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run the module's forward under autocast and hand fp32 outputs back (as accelerate does
    for DDP): DeepSpeed bf16 keeps bf16 weights, and fp32 inputs would not match them."""
    from accelerate.utils import convert_outputs_to_fp32

    module.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=dtype)(module.forward))


def groups_time_out(timeout_s: float) -> None:
    """Every process group times out after `timeout_s`, as the default group does: DeepSpeed makes
    its data-parallel groups with torch.distributed.new_group and no timeout, i.e. torch's default
    (30 min for gloo), so a frozen rank would hang its peers in ZeRO's collectives for that long.
    Applied to the groups that exist and to those made later."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)
    real = dist.new_group
    if getattr(real, "_gentrain_timeout", None) is not None:
        real = real.__wrapped__

    def new_group(*args: Any, **kwargs: Any):
        if len(args) < 2 and kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        return real(*args, **kwargs)

    new_group.__wrapped__, new_group._gentrain_timeout = real, timeout
    dist.new_group = new_group


class NetGroup(nn.Module):
    """The nets one optimizer trains, as the one module of their DeepSpeed engine: ``forward(name,
    ...)`` runs net `name`, so each call goes through the engine (ZeRO-3's parameter hooks, autocast)."""

    def __init__(self, nets: dict[str, nn.Module]):
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.nets[name](*args, **kwargs)


class GroupMember:
    """Net `name` of a :class:`NetGroup` engine, called as the net itself."""

    def __init__(self, engine: Any, name: str):
        self.engine, self.name = engine, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(self.name, *args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.engine.module.nets[self.name]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters(recurse)


def engine_key(nets: tuple[str, ...]) -> str:
    """A phase's engine name: its net's name (deepspeed/NET/ in checkpoints), or theirs joined by '+'."""
    return "+".join(nets)
