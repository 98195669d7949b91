"""The one door to accelerate, DeepSpeed and torch.distributed: nothing outside this package imports them.

- ``backend``: the ``Backend`` protocol the Trainer alone calls;
- ``core``: the Accelerator, the launch guard, rank helpers, the metrics tracker;
- ``ddp``: the default backend (accelerate's prepare: DDP or one process);
- ``deepspeed``: DeepSpeed engines (one per trained phase) and their elastic reload, with
  ``ds_config`` (the resolved DeepSpeed config), ``ds_engines`` (what an engine is built from),
  ``zero_shards`` (each rank's ZeRO shares, gathered whole) and ``ds_files`` (DeepSpeed's own files);
- ``fsdp2`` / ``fsdp2_state``: FSDP2 (fully_shard per trained net), DTensor shards <-> whole files;
- ``collectives``: the few cross-rank sums a family's maths needs (the VQ codebook's statistics,
  a gradient taken outside DDP), as plain functions that are no-ops in one process.

This package knows nothing of families, data or configs' meaning: it takes nn.Modules and
optimizers. It sits low in the house so that nets and objectives may call ``collectives``; that
only the Trainer calls the backends is held by the import contracts (``.importlinter``).
"""
