"""The step's fast paths, each a `train.*` switch (measured by bench/step_speed.py; docs/benchmarks.md "Speed").

- ``train.compile``: torch.compile of each trained net's ``forward`` (``default`` or a named mode
  such as ``max-autotune-no-cudagraphs``). The module itself is left as it is, so its state dict,
  checkpoints, EMA and exports do not change; only the training step runs compiled (previews and
  evaluation run eager: their eval/no-grad graphs and sampling batch sizes would each compile
  again). The compile's seconds, graphs and graph breaks are logged as ``compile/*``.
- ``train.channels_last``: the trained nets' 4-D weights and the image batch in NHWC.
- ``train.fused_optimizer``: torch's fused Adam/AdamW kernel (CPU and CUDA).
- ``train.allow_tf32``: TF32 matmuls and convolutions on CUDA (no effect on a CPU).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions when enabled (CUDA only)."""
    if enabled and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def has_conv(net: nn.Module) -> bool:
    return any(p.dim() == 4 for p in net.parameters())


def to_channels_last(nets: dict[str, nn.Module], names: list[str]) -> None:
    """The named nets' 4-D parameters and buffers in channels_last, in place (before the optimizer
    and DDP see them: the parameters stay the same objects)."""
    for n in names:
        if has_conv(nets[n]):
            nets[n].to(memory_format=torch.channels_last)


def batch_channels_last(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4
            and v.is_floating_point() else v for k, v in batch.items()}


def compile_forward(net: nn.Module, mode: str) -> None:
    """Replace ``net.forward`` by one that runs torch.compile's version while the net trains with
    gradients on, and the eager one otherwise (sampling, evaluation, frozen use in a GAN phase)."""
    eager: Callable = net.forward
    compiled = torch.compile(eager, mode=None if mode == "default" else mode)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if net.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    net.forward = forward


def compile_stats() -> dict[str, float]:
    """Seconds spent compiling so far, graphs compiled and graph breaks (torch._dynamo's counters)."""
    from torch._dynamo import utils

    times = getattr(utils, "compilation_time_metrics", {}).get("_compile.compile_inner", [])
    return {"compile/seconds": float(sum(times)),
            "compile/graphs": float(utils.counters["stats"].get("unique_graphs", 0)),
            "compile/graph_breaks": float(sum(utils.counters["graph_break"].values()))}
