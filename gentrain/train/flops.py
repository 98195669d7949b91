"""Model FLOPs of a training step and the machine's peak, for utilisation (MFU) figures.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add) over one
forward + backward. Two corrections: on CPU the counter gives 0 for
``scaled_dot_product_attention``, so its 4*B*H*Lq*Lk*D per forward (QK^T and AV) and twice that
per backward are added from the shapes seen; and a gradient-checkpointed net's recompute is not
model work, so count with checkpointing off (``model_flops`` takes the step as a function, the
caller decides).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


class _AttentionShapes(TorchFunctionMode):
    """Records (B*H, Lq, Lk, D) of every scaled_dot_product_attention call, and whether it needs grad."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, int, int, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            bh = q.numel() // (q.shape[-2] * q.shape[-1])
            self.calls.append((bh, q.shape[-2], k.shape[-2], q.shape[-1], q.requires_grad))
        return func(*args, **(kwargs or {}))


def model_flops(step: Callable[[], Any]) -> dict[str, float]:
    """FLOPs of one call of ``step`` (a forward + backward): {"total", "counted", "attention_added"}."""
    shapes = _AttentionShapes()
    counter = FlopCounterMode(display=False)
    with counter, shapes:
        step()
    counted = float(counter.get_total_flops())
    sdpa_counted = sum(v for name, v in counter.get_flop_counts().get("Global", {}).items()
                       if "scaled_dot_product" in str(name))
    added = 0.0
    if shapes.calls and sdpa_counted == 0:
        for bh, lq, lk, d, grad in shapes.calls:
            added += 4.0 * bh * lq * lk * d * (3 if grad else 1)
    return {"total": counted + added, "counted": counted, "attention_added": added}


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu", seconds: float = 2.0) -> float:
    """FLOP/s of a large square matmul on this machine (the utilisation reference), best of repeats."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best, t_end = 0.0, time.perf_counter() + seconds
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    while best == 0.0 or time.perf_counter() < t_end:   # at least one timing, however slow the warm-up was
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        sync()
        best = max(best, 3 * 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best
