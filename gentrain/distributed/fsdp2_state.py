"""FSDP2 state whole and back: DTensor shards <-> the whole tensors gentrain's files hold.

Every function here that gathers is a collective (every rank calls it, in the same order). The
files are the ones a DDP run writes: ``model*.safetensors`` (whole weights) and accelerate's
``optimizer*.bin`` (a torch optimizer state dict of whole tensors, indexed by parameter position,
read with ``weights_only=True``), so a DDP run and an FSDP2 run read each other's checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from gentrain.errors import GentrainError
from gentrain import checkpoint as ckpt
from gentrain.distributed.portable import check_count, read_torch_optimizer


def local(t: Tensor) -> Tensor:
    """This rank's shard of `t` (a live view sharing its storage), or `t` itself when whole."""
    if not isinstance(t, DTensor):
        return t
    with torch.enable_grad():   # the view requires grad as the parameter does (diffusers' EMAModel averages only those)
        return t.to_local()


def whole(like: Tensor, t: Tensor) -> Tensor:
    """Collective when `like` is a DTensor: the whole tensor from this rank's shard `t` of it."""
    if not isinstance(like, DTensor):
        return t.detach()
    d = DTensor.from_local(t.detach(), like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                           run_check=False)
    return d.full_tensor()


def shard_of(like: Tensor, full: Tensor) -> Tensor:
    """This rank's shard (local tensor) of the whole tensor `full`, laid out as `like` (no communication:
    every rank holds `full`)."""
    full = full.detach().to(like.device, like.dtype)
    if not isinstance(like, DTensor):
        return full.view(like.shape).clone()
    return distribute_tensor(full.view(like.shape), like.device_mesh, like.placements, src_data_rank=None).to_local()


def as_like(like: Tensor, full: Tensor) -> Tensor:
    """`full` as a tensor of `like`'s kind: a DTensor sharded as `like`, or a whole tensor."""
    if not isinstance(like, DTensor):
        return full.detach().to(like.device, like.dtype).view(like.shape).clone()
    return DTensor.from_local(shard_of(like, full), like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride(), run_check=False)


def full_state_dict(module: nn.Module, keys: list[str] | None = None) -> dict[str, Tensor]:
    """Collective: the module's state dict (its tensors `keys` only, when given), every tensor whole,
    on the CPU (every rank gets it)."""
    sd, keep = module.state_dict(), None if keys is None else set(keys)
    return {k: whole(v, local(v) if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in sd.items() if keep is None or k in keep}


def load_weights(module: nn.Module, f: Path, keys: list[str] | None = None) -> None:
    """The whole weights of file `f` into `module` (each rank keeps its shard); the file must hold
    exactly the module's tensors (its tensors `keys`, when given: a LoRA net's adapters)."""
    from safetensors.torch import load_file

    if not f.is_file():
        raise GentrainError(f"checkpoint file {f} is missing")
    full = load_file(str(f))
    own = module.state_dict()
    if keys is not None:
        own = {k: own[k] for k in keys}
    ckpt.check_keys(f, set(full), own.keys())
    with torch.no_grad():
        for k, v in own.items():
            if tuple(full[k].shape) != tuple(v.shape):
                raise GentrainError(f"{f}: tensor {k!r} has shape {tuple(full[k].shape)}, the net has {tuple(v.shape)}")
            if isinstance(v, DTensor):
                local(v).copy_(shard_of(v, full[k]))
            else:
                v.copy_(full[k].to(v.device, v.dtype))


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: `opt`'s state dict with every per-parameter tensor whole, on the CPU; indexed by
    parameter position as torch (and so accelerate's DDP checkpoint) writes it."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):
        if p not in opt.state:
            continue
        state[i] = {k: (whole(v, v.to_local()) if isinstance(v, DTensor) else v).detach().cpu().clone()
                    if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def save_optimizer(opt: torch.optim.Optimizer, f: Path, main: bool) -> None:
    sd = full_optimizer_state(opt)
    if main:
        torch.save(sd, f)


def load_optimizer(opt: torch.optim.Optimizer, f: Path) -> None:
    """A whole optimizer state file (`save_optimizer`'s, or a DDP run's) into `opt`, cut into this rank's shards."""
    sd = read_torch_optimizer(f)
    check_count(f, sd, sum(len(g["params"]) for g in opt.param_groups), len(opt.param_groups))
    load_whole_optimizer(opt, sd)


def load_whole_optimizer(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """A torch optimizer state dict of whole tensors into `opt`, cut into this rank's shards."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[int(i)] = {k: as_like(p, v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
