"""Cost of an elastic remap (gentrain/data_pipeline/elastic.py): the replay of the old lanes.

Writes --samples samples (32x32 RGB PNG + caption, ~3 KB each) in 40 shards, puts 2 ranks x 1
lane at half an epoch (a position as state_dict() saves it), and times: the plan-only replay of
one lane's half epoch, the header replay of the same (what a lane that counted shard events
costs), and the whole remap onto 1 rank (ShardStream.remapped_state); prints seconds per 10k
replayed samples and the size of the remapped state as JSON.
Run: PYTHONPATH=. python bench/elastic_replay.py [--samples 20000] [--shuffle-buffer 1000]
"""
import argparse
import io
import json
import tempfile
import time

import numpy as np
from PIL import Image

from gentrain.data_pipeline.config import DataConfig
from gentrain.data_pipeline.elastic import replay_positions
from gentrain.data_pipeline.reader import make_shard_stream
from gentrain.data_pipeline.writer import ShardSetWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        w = ShardSetWriter(d, max_samples=-(-args.samples // 40), source="bench", check_images=False)
        for i in range(args.samples):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            w.write({"__key__": f"k{i:07d}", "png": buf.getvalue(), "txt": f"caption {i}"})
        w.close()
        cfg = DataConfig(source="shards", shards=d, shuffle_buffer=args.shuffle_buffer)
        old = [make_shard_stream(cfg, batch_size=8, rank=r, world_size=2, seed=0) for r in range(2)]
        half = old[0].samples_per_epoch // 2
        saved = []
        for st in old:
            state = st.state_dict()
            state["lane_states"] = [{"episode": 0, "offset": half, "events": 0, "pending": []}]
            state["consumed_batches"], state["consumed_samples"] = half // 8, half
            saved.append(state)
        base = np.r_[0, np.cumsum(old[0].spec.counts)[:-1]].tolist()
        out = {"samples": args.samples, "shuffle_buffer": args.shuffle_buffer, "replayed_per_lane": half}
        for headers in (False, True):
            t = time.perf_counter()
            replay_positions(old[0].spec, 0, 0, None, base, half, headers=headers)
            s = time.perf_counter() - t
            out["headers" if headers else "plan_only"] = {"s": round(s, 3), "s_per_10k": round(s * 1e4 / half, 3)}
        new = make_shard_stream(cfg, batch_size=8, rank=0, world_size=1, seed=0)
        t = time.perf_counter()
        state = new.remapped_state(saved)
        out["remap_2_to_1_s"] = round(time.perf_counter() - t, 3)
        out["remapped_state_json_bytes"] = len(json.dumps(state))
        out["remapped_segments"] = len(state["lane_states"][0]["remap"]["episodes"]["0"]) // 3
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
