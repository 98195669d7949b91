"""FSDP2 columns of the memory plan: ``fully_shard`` as gentrain's FSDP2 backend applies it (each
block of a trained net -- an item of its outermost ``ModuleList`` -- then the net's root;
``distributed/fsdp2.py``), with and without ``CPUOffloadPolicy``.

FSDP2 shards every trained parameter on dim 0 over the D ranks (one DTensor per parameter), so
weights, gradients and Adam state are divided by D as under ZeRO-3. The sharded weights keep the
dtype they were made in (fp32): they are what the optimizer updates, so there is no separate fp32
master; the gradients are reduce-scattered into fp32 shards (``reduce_dtype``); gentrain's EMA
follows each rank's local shards. ``MixedPrecisionPolicy(param_dtype=bf16)`` changes only what is
gathered: the unsharded weights of a block are bf16 (w = 2 bytes; w = 4 in fp32).

                        weights   grads   Adam m, v   master   EMA (fp32)
    FSDP2 (fp32, bf16)  4/D       4/D     8/D         -        4/D       module buffers whole
    FSDP2 + offload     host      host    host        -        host      the step runs on the CPU

Gathered and in flight (the "comm buffers" row); b = parameters of the largest block, R = those of
the nets outside their blocks (torch 2.13's ``_fully_shard``; the roots of all trained nets, as one
phase's loss may run through another's net), at the start of backward, where the activations peak:
the roots' weights (gathered at the first forward and kept to the end of backward: FSDP2 does not
reshard the root after forward), the last block's weights, the next block's all-gather output
(prefetched) and the block's unsharded gradients (param dtype):
        buffers = w R + 3 w b
Later in backward the roots' unsharded gradients (up to w R) and one fp32 reduce-scatter input
(4 b) come while the processed blocks' activations go, and the sharded gradients, counted whole in
their row, are still being made: on flow_toy2d (2 ranks, batch 128) the plan is 9-12 % over a
real step (tests/launch/test_plan.py). The forward holds less (the roots, two all-gather outputs, a block).
Not modelled: dim-0 padding of each shard to a multiple of D (under one row per tensor and rank),
the all-gather's flat input (w b / D, transient), the collective library's own buffers.

Activations: as measured, less autocast's bf16 weight copies when w = 2 (the gathered weights are
bf16 already). Scratch after backward: Adam's sqrt(v) over one phase's shards (4 T/D; foreach on
GPUs), diffusers EMAModel's foreach difference (4 E_t/D).

Offload (``fsdp_offload_params: true``): weights, gradients, Adam state and the EMA (which follows
the shards) live in pinned host memory and the optimizer and EMA steps run on the CPU; the GPU holds
the module buffers, the gathered weights and buffers above (+ each block's shard copied in,
w b / D) and the activations. Host memory, both columns: the shards (offload), and a whole fp32
twin of each trained net that the backend keeps on every rank to sample and preview with (4 P).
"""
from __future__ import annotations

from typing import Any, Optional

from gentrain.launch.plan.ema_memory import ema_counts


def per_gpu_fsdp2(model: Any, offload: bool, gpus: int, nodes: int, precision: str, act: Optional[Any],
                  batch: int) -> dict[str, float]:
    """Bytes per GPU of each plan row (no 'frozen' or 'total': the caller adds them) and
    'host_per_node' (see the module docstring)."""
    D, nets = gpus * nodes, model.nets
    w = 2 if precision in ("bf16", "fp16") else 4      # FSDP2 refuses fp16: planned as bf16 (make_plan notes it)
    P, T = sum(n.params for n in nets), sum(n.trained for n in nets)
    E, E_t = ema_counts(model)   # posthoc: one copy per profile, no scratch (ema_memory.py)
    buf = sum(n.buffer_bytes for n in nets)
    by_name = {n.name: n for n in nets}
    T_phase = max(sum(by_name[k].trained for k in ph) for ph in model.phases)
    # every sharded net's root may be gathered at once (a GAN's generator loss runs through the critic)
    gathered = w * sum(n.fsdp_root for n in nets) + 3 * w * max(n.fsdp_block for n in nets)
    twins = 4 * P                                      # whole fp32 twins, host memory, every rank
    r = dict(params=4 * P / D + buf, grads=4 * T / D, optimizer=8 * T / D, master=0, ema=4 * E / D,
             buffers=gathered, activations=act.at(batch, less_weight_copies=w == 2) if act else 0,
             scratch=4 * max(T_phase, E_t) / D, host_per_node=gpus * twins)
    if offload:
        block = max(n.fsdp_block for n in nets)
        host = (4 * P + 12 * T + 4 * E + 4 * max(T_phase, E_t)) / D
        r.update(params=buf, grads=0, optimizer=0, ema=0, scratch=0, buffers=gathered + w * block / D,
                 host_per_node=gpus * (host + twins))
    return r


def bytes_per_param_fsdp2() -> dict[str, str]:
    """The accounting as text per column (per trained parameter; EMA per EMA'd parameter)."""
    return {"fsdp2": "(4 w + 4 g + 8 Adam + 4 EMA)/D, fp32 shards; gathered: one block at a time (bf16 under bf16)",
            "fsdp2_offload": "gathered blocks only on the GPU; (4 w + 4 g + 8 Adam + 4 EMA)/D in host memory"}
