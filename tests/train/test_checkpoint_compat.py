"""A run saved before the house move (commit f7f2e0f's code, tests/fixtures/f7f2e0f_flow_toy2d)
resumes with today's code at its saved step, with the saved weights, and trains on."""
import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ok, read_metrics, reset_accelerate_state, run_cli

FIXTURE = Path(__file__).parents[1] / "fixtures" / "f7f2e0f_flow_toy2d"
NAME = "f7f2e0f_flow_toy2d"   # run.name in its config.yaml


def old_run(tmp_path: Path) -> Path:
    """A copy of the saved run directory as TMP_PATH/NAME, its config's run.output_dir (where the old
    code wrote it, /tmp/h3old) set to TMP_PATH: a resume refuses a changed run.output_dir."""
    run_dir = tmp_path / NAME
    shutil.copytree(FIXTURE / "run", run_dir)
    config = run_dir / "config.yaml"
    text = config.read_text()
    assert text.count("output_dir: /tmp/h3old\n") == 1
    config.write_text(text.replace("output_dir: /tmp/h3old\n", f"output_dir: {tmp_path}\n"))
    return run_dir


def test_old_checkpoint_loads_its_weights_and_step(tmp_path):
    from gentrain.config import load_config
    from gentrain.train.loop import Trainer

    run_dir = old_run(tmp_path)
    saved = run_dir / "checkpoints" / "step_3"
    reset_accelerate_state()
    try:
        cfg = load_config(str(run_dir / "config.yaml"))
        trainer = Trainer(cfg, run_dir, resume_from=saved)
        assert trainer.step == 3
        weights = load_file(str(saved / "model.safetensors"))
        net = trainer.raw_nets["velocity"].state_dict()
        assert sorted(net) == sorted(weights)
        for k, v in weights.items():
            assert net[k].cpu().equal(v), k
        ema = load_file(str(saved / "ema_velocity.safetensors"))
        names = [k for k, _ in trainer.raw_nets["velocity"].named_parameters()]
        shadow = dict(zip(names, trainer.emas["velocity"].shadow_params))
        assert sorted(shadow) == sorted(ema)
        for k, v in ema.items():
            assert shadow[k].cpu().equal(v), k
        assert not any(math.isclose(0.0, float(v.abs().sum())) for v in weights.values())
    finally:
        reset_accelerate_state()


def test_old_run_resumes_at_its_step_and_trains_on(tmp_path):
    run_dir = old_run(tmp_path)
    r = run_cli("train", str(run_dir / "config.yaml"), "--resume", "auto")
    ok(r)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_3'} (step 3)" in r.stderr, r.stderr[-2000:]
    rows = [m for m in read_metrics(run_dir) if "loss/main" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]    # every step logged once: none redone, none lost
    assert all(math.isfinite(m["loss/main"]) for m in rows)
    # the steps after the resume are those the old code trained without a stop (same weights,
    # optimizer moments, schedule, RNG and data position); CPU floats, so equal to within rounding
    straight = {m["step"]: m for m in map(json.loads, (FIXTURE / "straight_metrics.jsonl").read_text().splitlines())
                if "loss/main" in m}
    for m in rows[3:]:
        for key in ("loss/main", "grad_norm/main", "lr/main"):
            assert m[key] == pytest.approx(straight[m["step"]][key], rel=1e-5, abs=1e-12), (m["step"], key)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3", "step_6"]
