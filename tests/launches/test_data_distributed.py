"""Exact epochs under a real 2-process launch (torchrun, gloo, CPU), 2 workers per rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import free_port
from data_helpers.shards import write_uneven

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_two_workers_read_each_sample_once_with_equal_batches(tmp_path):
    shards = tmp_path / "shards"
    keys = write_uneven(str(shards))  # 7 shards of 10-13 samples, 81 in all
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = ["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(HERE, "data_helpers", "dist_reader.py"), str(shards), str(out), "6", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for i, b in enumerate((6, 8)):  # lane-batches of 3 and 4
        runs = [r["runs"][i] for r in ranks]
        assert runs[0]["batch_size"] == runs[1]["batch_size"] == b
        # every rank took the same number of batches of the same size, and reads as much per epoch
        assert runs[0]["batches"] == runs[1]["batches"]
        assert runs[0]["samples_per_epoch"] == runs[1]["samples_per_epoch"] == 84 // 2
        for e in (0, 1):
            seen = Counter(k for run in runs for k, x in zip(run["keys"], run["epochs"]) if x == e)
            assert set(seen) == set(keys), f"epoch {e}: samples missing"
            dups = sum(seen.values()) - len(keys)
            assert dups == runs[0]["padding"] == 3  # 4 lanes x 21 = 84 = 81 + 3 <= R*W-1
        for run in runs:
            order = [[k for k, x in zip(run["keys"], run["epochs"]) if x == e] for e in (0, 1)]
            assert order[0] != order[1]  # a new shuffle each epoch
            assert run["resume_ok"]
        # the ranks read different samples (no two ranks on the same range)
        ep0 = [{k for k, x in zip(run["keys"], run["epochs"]) if x == 0} for run in runs]
        assert len(ep0[0] & ep0[1]) <= 3
