"""Cross-rank sums for a family's maths, no-ops in a single process (no process group)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Every rank waits here for the others (e.g. while rank 0 writes files they read); a no-op in one process."""
    if world_size() > 1:
        dist.barrier()


def sum_(t: Tensor) -> Tensor:
    """Sum `t` over ranks, in place; `t` unchanged in one process."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of `t` over ranks (a new tensor), as DDP's gradient all-reduce makes it."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def global_rows(flat: Tensor, k: int) -> Tensor:
    """k rows (k, D) drawn uniformly from the rows of the *global* batch, the concatenation over
    ranks of each rank's `flat` (N_r, D): the same rows on every rank, and the same as one process
    holding the whole batch draws (torch's RNG, rank 0's draw), so replicated tensors stay equal
    and do not depend on the process layout."""
    if world_size() == 1:
        return flat[torch.randint(0, flat.shape[0], (k,), device=flat.device)]
    sizes = [torch.zeros((), dtype=torch.long, device=flat.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(flat.shape[0], device=flat.device))
    sizes = torch.stack(sizes)
    pick = torch.randint(0, int(sizes.sum()), (k,), device=flat.device)
    dist.broadcast(pick, src=0)
    local = pick - sizes[:rank()].sum()                    # this rank's rows are [start, start + N_r)
    mine = (local >= 0) & (local < flat.shape[0])
    fresh = torch.zeros(k, flat.shape[1], dtype=flat.dtype, device=flat.device)
    fresh[mine] = flat[local[mine]]
    dist.all_reduce(fresh)                                 # each row comes from exactly one rank
    return fresh
