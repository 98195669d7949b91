"""Run under torchrun (2 processes): each rank reads the shard set with 2 workers, all-reducing
once per batch (a rank that ran out would hang the others), and writes what it saw as JSON.

usage: dist_reader.py SHARD_DIR OUT_DIR BATCH_SIZE [BATCH_SIZE ...]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from gentrain.data_pipeline.config import DataConfig
from gentrain.data_pipeline.reader import make_shard_stream


def main() -> None:
    shards, out_dir, sizes = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(source="shards", shards=shards, num_workers=2, shuffle_buffer=8)
    result = {"rank": rank, "runs": []}
    for b in sizes:
        st = make_shard_stream(cfg, batch_size=b, rank=rank, world_size=world, seed=11)
        # enough batches for every lane to finish epochs 0 and 1 (a batch takes b / W from each lane)
        n = -(-2 * st.samples_per_epoch // b)
        keys, epochs, it = [], [], iter(st)
        for i in range(n):
            batch = next(it)
            step = torch.tensor([1.0])
            dist.all_reduce(step)  # every rank must reach every step
            assert step.item() == world
            keys += batch["key"]
            epochs += batch["epoch"].tolist()
            if i == n // 3:
                saved = json.loads(json.dumps(st.state_dict()))
                after_save = len(keys)
        # resume from the mid-epoch position: the rest must be what the straight run read
        again = make_shard_stream(cfg, batch_size=b, rank=rank, world_size=world, seed=11)
        again.load_state_dict(saved)
        resumed, it2 = [], iter(again)
        while len(resumed) < len(keys) - after_save:
            resumed += next(it2)["key"]
        result["runs"].append({"batch_size": b, "batches": n, "samples_per_epoch": st.samples_per_epoch,
                               "padding": st.padding, "keys": keys, "epochs": epochs,
                               "resume_ok": resumed == keys[after_save:], "stats": st.stats()})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
