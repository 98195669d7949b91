"""Everything that knows about accelerate / DeepSpeed / torch.distributed specifics lives here.

- ``core``: the Accelerator, the launch guard, rank helpers, the metrics tracker;
- ``ddp``: the default backend (accelerate's prepare: DDP or one process);
- ``deepspeed``: DeepSpeed engines (one per trained net), ZeRO gathers, their checkpoints;
- ``fsdp2`` / ``fsdp2_state``: FSDP2 (fully_shard per trained net), DTensor shards <-> whole files;
- ``plan``: the per-GPU memory plan (``gentrain plan``).

Objectives and nets never import from here: the Trainer asks this package to prepare its nets
and optimizers and to save / load their state.
"""
from .core import (JSONLTracker, barrier, check_world_size, deepspeed_config, is_main_env, make_accelerator,
                   make_backend, max_over_ranks, process_state, uses_deepspeed)

__all__ = ["JSONLTracker", "barrier", "check_world_size", "deepspeed_config", "is_main_env", "make_accelerator",
           "make_backend", "max_over_ranks", "process_state", "uses_deepspeed"]
