"""Defaults that configs take from the backends (light: importing this loads no accelerate)."""

# DDP's gradient all-reduce as torch sets it; config.TrainConfig's train.ddp_* defaults, and what a
# DeepSpeed launch checks were left alone
DDP_DEFAULTS = {"ddp_bucket_mb": 25, "ddp_bucket_view": False, "ddp_comm_hook": "no"}
