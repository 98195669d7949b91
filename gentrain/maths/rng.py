"""The training step's per-sample random draws, independent of how the global batch is split."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor


class BatchRNG:
    """Per-sample random draws of a training step that do not depend on how the global batch is split.

    Every rank runs the same torch RNG stream (seeded alike). A draw for this rank's B rows is made
    for the global batch of world_size x B rows, and the rank keeps rows [rank*B, (rank+1)*B): so
    2 processes at batch B draw, sample for sample, what 1 process draws at batch 2B, and the stream
    advances alike on every rank. Rank 0 of 1 (the default) is plain torch draws. The price is
    world_size x the numbers a rank uses, small beside a forward pass at the widths trained here (a
    counter-based generator would skip to the rank's rows instead).

    It needs the same local batch shape on every rank; where shapes differ (aspect buckets) the
    ranks' streams drift apart, which leaves each draw valid but not layout-invariant.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, generator: torch.Generator | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.generator = rank, world_size, generator

    def _rows(self, draw: Any, n: int, shape: tuple[int, ...], **kw: Any) -> Tensor:
        full = draw((self.world_size * n, *shape), generator=self.generator, **kw)
        return full if self.world_size == 1 else full[self.rank * n:(self.rank + 1) * n]

    def rows(self, draw: Any, n: int, *shape: int, **kw: Any) -> Tensor:
        """(n, *shape) rows of any draw called as draw(size, generator=, **kw) (e.g. diffusers'
        samplers that take a generator), split across ranks as the draws below are."""
        return self._rows(draw, n, shape, **kw)

    def randn(self, n: int, *shape: int, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
        """(n, *shape) standard normal."""
        return self._rows(torch.randn, n, shape, device=device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(*x.shape, device=x.device, dtype=x.dtype)

    def rand(self, n: int, *shape: int, device: Any = None) -> Tensor:
        """(n, *shape) uniform on [0, 1)."""
        return self._rows(torch.rand, n, shape, device=device)

    def randint(self, low: int, high: int, n: int, *shape: int, device: Any = None) -> Tensor:
        """(n, *shape) integers uniform on [low, high)."""
        return self._rows(lambda size, **kw: torch.randint(low, high, size, **kw), n, shape, device=device)


@contextmanager
def untouched_rng() -> Iterator[None]:
    """The global RNGs (torch CPU and CUDA, python, numpy) as they were after the block: the objective's draws
    come from torch's global stream (BatchRNG), which a DataLoader's seed or a pipeline would otherwise advance,
    so a resumed run (its streams restored from the checkpoint) would draw differently from one run straight."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
