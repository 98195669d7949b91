"""One rank's memory in a real FSDP2 training step on CPU, for tests/launch/test_plan.py, run as
`accelerate launch --config_file <shipped fsdp2.yaml> --num_processes N tests/launch/fsdp2_memory_probe.py
OUT PRESET [KEY=VALUE ...]`: each rank writes OUT/rank_R.json with its peak bytes
(test_plan.measured_trainer_peak: what the Trainer's construction leaves alive + the live peak of
3 steps, op by op, FSDP2's in-place storage resizes and DTensors' local shards included), the
whole twins to sample with left out (host memory on a GPU machine) and reported apart.
"""
import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # test_plan, conftest


def main() -> int:
    out, preset, *overrides = sys.argv[1:]
    from test_plan import measured_trainer_peak, trainer_cfg

    out = Path(out)
    twins: list = []

    def host(trainer):
        twins.extend(t for m in getattr(trainer.backend, "twins", {}).values() for t in m.state_dict().values())
        return twins

    cfg = trainer_cfg(out, preset, *overrides)
    parts: dict = {}
    peak = measured_trainer_peak(cfg, out / "run", host=host, parts=parts)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank_{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_bytes": peak, **parts, "twins_bytes": sum(t.numel() * t.element_size() for t in twins)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
