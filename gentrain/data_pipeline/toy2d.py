"""The seed's 2-D toy distributions and an in-process, resumable stream of them.

The global batch of step i (world_size x B points) is a pure function of (seed, i), and rank r
takes its rows [r*B, (r+1)*B): so the global batch does not depend on the process count (1 process
at 2B reads what 2 processes at B read together), and the stream's position is just the number of
batches consumed. Any number of DataLoader workers gives the same sequence: worker w of W makes
batches w, w+W, w+2W, ... and the DataLoader hands them out round-robin, in order.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gentrain.errors import GentrainError

TOY2D = ("checkerboard", "8gaussians", "moons", "ring8", "grid25")
# the mode-collapse benchmarks of VEEGAN (Srivastava et al. 2017) and PacGAN (Lin et al. 2018):
# equal-weight gaussian mixtures with known centres, scored by eval.metrics.mode_metrics
RING8_RADIUS, RING8_STD = 2.0, 0.02
GRID25_STD = 0.05


def toy2d_modes(name: str) -> tuple[torch.Tensor, float]:
    """(centres (K, 2), std) of a mixture benchmark: ``ring8``, 8 modes evenly on a circle of
    radius 2 (the first at angle 0), std 0.02; ``grid25``, 25 modes at {-4, -2, 0, 2, 4}^2 (x
    varying fastest), std 0.05. Every mode has weight 1/K and isotropic std."""
    if name == "ring8":
        ang = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
        return torch.stack([torch.cos(ang), torch.sin(ang)], 1) * RING8_RADIUS, RING8_STD
    if name == "grid25":
        v = torch.arange(-4.0, 5.0, 2.0)
        y, x = torch.meshgrid(v, v, indexing="ij")
        return torch.stack([x.flatten(), y.flatten()], 1), GRID25_STD
    raise ValueError(f"toy2d distribution {name!r} has no mode centres; choose ring8 or grid25")


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n points (n, 2) from a named distribution, roughly within [-3, 3]^2 (grid25: [-4.2, 4.2]^2)."""
    g = generator
    if name in ("ring8", "grid25"):  # see toy2d_modes
        centers, std = toy2d_modes(name)
        k = torch.randint(0, len(centers), (n,), generator=g)
        return centers[k] + std * torch.randn(n, 2, generator=g)
    if name == "checkerboard":  # FFJORD's checkerboard, scaled to [-2, 2]^2
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2_ = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2_ + torch.floor(x1) % 2
        return torch.stack([x1, x2], 1)
    if name == "8gaussians":  # 8 modes on a circle of radius 2, std 0.2
        k = torch.randint(0, 8, (n,), generator=g).float()
        ang = k * (2 * math.pi / 8)
        centers = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * 2.0
        return centers + 0.2 * torch.randn(n, 2, generator=g)
    if name == "moons":  # two interleaved half circles, noise 0.1, centred
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.randint(0, 2, (n,), generator=g).bool()
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.5
        return pts + 0.1 * torch.randn(n, 2, generator=g)
    raise ValueError(f"unknown toy2d distribution {name!r}; choose one of {', '.join(TOY2D)}")


def _batch_seed(seed: int, index: int) -> int:
    # a fixed mixing of the two integers (no Python hash(): it is salted per process)
    return (seed * 1_000_003 + index * 104_729) % (2**63 - 1)


class _Toy2DBatches(IterableDataset):
    def __init__(self, name: str, batch_size: int, seed: int, rank: int, world_size: int, start: int):
        self.name, self.batch_size, self.seed, self.start = name, batch_size, seed, start
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.global_size = world_size * batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + w
        while True:
            g = torch.Generator().manual_seed(_batch_seed(self.seed, index))
            yield {"x": sample_toy2d(self.name, self.global_size, g)[self.rows], "index": index}
            index += nw


class Toy2DStream:
    """Endless batches {"x": (B, 2)} of a toy distribution; position = batches consumed."""

    def __init__(self, name: str, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        if name not in TOY2D:
            raise ValueError(f"data.toy2d: unknown distribution {name!r}; choose one of {', '.join(TOY2D)}")
        self.name, self.batch_size, self.seed, self.rank, self.world_size = name, batch_size, seed, rank, world_size
        self.num_workers = num_workers
        self.consumed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = _Toy2DBatches(self.name, self.batch_size, self.seed, self.rank, self.world_size, self.consumed)
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False)
        for batch in loader:
            assert batch.pop("index") == self.consumed, "toy2d batches arrived out of order"
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "toy2d", "consumed": self.consumed}

    def remapped_state(self, saved: list[dict[str, Any]]) -> dict[str, Any]:
        """The position for this rank from every saved rank's (elastic resume): the global batch of
        step i is drawn whole, so any rank's count fits any layout of the same global batch."""
        if len({s.get("consumed") for s in saved}) != 1:
            raise GentrainError(f"the saved toy2d positions disagree ({[s.get('consumed') for s in saved]})")
        return dict(saved[0])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "toy2d":
            raise ValueError(f"data position is for a {state.get('kind')!r} stream, not toy2d")
        self.consumed = int(state["consumed"])

    def stats(self) -> dict[str, float]:
        return {}
