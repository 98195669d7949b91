"""ZeRO's shards: each rank's share of the fp32 master weights and optimizer state, and the whole back.

DeepSpeed keeps a parameter's fp32 master (and its Adam moments) where its stage puts them: under
ZeRO-3 a 1-D padded partition per rank (``p.ds_id``), under ZeRO-1/2 and the bf16 optimizer a
fragment of a flat group (``p._hp_mapping``, maybe empty on a rank), at stage 0 in fp32 the
parameter itself. These helpers give each rank's share as a live view (what the EMA follows, no
gather per step), gather the whole tensor from the shares (a collective: to save, preview or
evaluate) and cut a whole tensor into this rank's share (elastic resume on another process count).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gentrain.errors import GentrainError


def local_master(p: nn.Parameter) -> Tensor:
    """This rank's share of `p`'s fp32 master weights, a live view. diffusers' EMAModel averages
    only tensors that require grad (it copies the others), which these views do."""
    if hasattr(p, "ds_id"):                     # ZeRO-3: this rank's partition (1-D, padded)
        share = p._z3_optimizer.get_local_fp32_param(p)
    elif hasattr(p, "_hp_mapping"):             # ZeRO-1/2 and the bf16 optimizer: a fragment, maybe none
        share = (p._hp_mapping.get_hp_fragment() if p._hp_mapping is not None
                 else torch.empty(0, device=p.device, requires_grad=True))
    elif p.dtype != torch.float32:              # stage 0 in bf16: no per-parameter fp32 master is exposed
        raise GentrainError("an EMA under DeepSpeed ZeRO-0 in bf16 would average the bf16 weights, not the fp32 "
                            "master (measured: resume then differs by 3e-3): use ZeRO stage 1 or higher, or "
                            "train.ema_decay=0")
    else:                                       # stage 0 in fp32: the parameter is the master
        share = p
    if not share.requires_grad:
        raise RuntimeError(f"DeepSpeed's fp32 master of a {tuple(p.shape)} parameter does not require grad: "
                           "diffusers' EMAModel would copy it instead of averaging it")
    return share


def full_from_local(p: nn.Parameter, local: Tensor) -> Tensor:
    """Collective: the whole fp32 tensor of parameter `p` from every rank's `local` share."""
    from deepspeed import comm as dist

    if hasattr(p, "ds_id"):
        parts = torch.empty(dist.get_world_size(group=p.ds_process_group) * local.numel(), dtype=torch.float32,
                            device=local.device)
        dist.all_gather_into_tensor(parts, local.float().contiguous(), group=p.ds_process_group)
        return parts[: p.ds_numel].view(p.ds_shape).clone()
    if hasattr(p, "_hp_mapping"):
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        if p._hp_mapping is not None:
            a = p._hp_mapping.lp_fragment_address
            buf.narrow(0, a.start, a.numel).copy_(local)
        dist.all_reduce(buf, group=p._dp_group)
        return buf.view(p.shape)
    return local.detach().float().clone()


def local_from_full(p: nn.Parameter, full: Tensor) -> Tensor:
    flat = full.detach().float().flatten().to(p.device)
    if hasattr(p, "ds_id"):
        from deepspeed import comm as dist

        size = p.ds_tensor.ds_numel
        start = dist.get_rank(group=p.ds_process_group) * size
        out = torch.zeros(size, dtype=torch.float32, device=p.device)
        piece = flat[start: start + size]
        out[: piece.numel()] = piece
        return out
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:
            return torch.empty(0, device=p.device)
        a = p._hp_mapping.lp_fragment_address
        return flat.narrow(0, a.start, a.numel).clone()
    return flat.view(p.shape).clone()


def optimizer_share(p: nn.Parameter, key: str, base: torch.optim.Optimizer) -> Tensor:
    """This rank's share of optimizer state `key` of parameter `p`, laid out as `local_master`."""
    if hasattr(p, "ds_id"):
        return p._z3_optimizer.get_local_fp32_param(p, key)
    if hasattr(p, "_hp_mapping"):
        return p._hp_mapping.get_hp_fragment(key) if p._hp_mapping is not None else torch.empty(0, device=p.device)
    return base.state[p][key]


def set_master(p: nn.Parameter, full: Tensor) -> None:
    """The whole fp32 value `full` into `p`: its fp32 master share and its working copy."""
    local = local_from_full(p, full)
    if hasattr(p, "ds_id"):
        p._z3_optimizer.set_local_hp_param(local, p)
        p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype))
        return
    if hasattr(p, "_hp_mapping") and p._hp_mapping is not None:
        p._hp_mapping.get_hp_fragment().data.copy_(local)
    p.data.copy_(full.to(p.device, p.dtype))


def set_optimizer_state(p: nn.Parameter, key: str, base: torch.optim.Optimizer, full: Tensor) -> None:
    local = local_from_full(p, full)
    if hasattr(p, "ds_id"):
        p._z3_optimizer.set_local_hp_param(local, p, key)
    elif hasattr(p, "_hp_mapping"):
        if p._hp_mapping is not None:
            p._hp_mapping.get_hp_fragment(key).data.copy_(local)
    else:   # stage 0 in fp32: the client optimizer's own per-parameter state
        base.state[p][key] = local.view_as(p)
