"""Everything that knows about accelerate / DeepSpeed / torch.distributed specifics lives here.

- ``core``: the Accelerator, the launch guard, rank helpers, the metrics tracker;
- ``deepspeed``: DeepSpeed engines (one per trained net), ZeRO gathers, their checkpoints;
- ``plan``: the per-GPU memory plan (``gentrain plan``).

Objectives and nets never import from here: the Trainer asks this package to prepare its nets
and optimizers and to save / load their state.
"""
from .core import (JSONLTracker, barrier, check_world_size, is_main_env, make_accelerator, max_over_ranks,
                   process_state, unwrap)

__all__ = ["JSONLTracker", "barrier", "check_world_size", "is_main_env", "make_accelerator", "max_over_ranks",
           "process_state", "unwrap"]
