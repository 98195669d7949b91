"""Whole-weight twins of sharded nets (DeepSpeed ZeRO, FSDP2): what the main rank samples with."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


@contextmanager
def loaded_twins(twins: dict[str, nn.Module], full: dict[str, dict[str, Tensor]],
                 ema: dict[str, dict[str, Tensor]], device: torch.device) -> Iterator[dict[str, nn.Module]]:
    """Each twin loaded with its net's whole weights (EMA swapped in where kept), on `device` in
    eval mode for the block; back on the CPU after it."""
    for n, twin in twins.items():
        twin.load_state_dict({**full[n], **{k: v.cpu() for k, v in ema.get(n, {}).items()}})
        twin.to(device).eval()
    try:
        yield dict(twins)
    finally:
        for twin in twins.values():
            twin.to("cpu")
