"""bench/posthoc_ema_t2i.py's pure parts: which shapes run it twins, the twin's overrides (the run's own
with the post-hoc EMA keys in place of its own), the config check that nothing else changed, and the
best length ranked as bench/shapes_quality.py ranks nets."""
import importlib.util
import math
from pathlib import Path

import pytest

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("posthoc_ema_t2i", REPO / "bench" / "posthoc_ema_t2i.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(net, minutes, run, worst, all_, steps=10):
    scores = {"colour": 0.9, "shape": 0.9, "size": 0.9, "position": worst, "count": 0.9, "all": all_}
    return {"net": net, "minutes": minutes, "run": run, "scores": scores, "preset": f"t2i_{net}", "steps": steps}


def test_picks_the_row_of_a_run_or_the_best_at_the_main_budget(tmp_path):
    b = _bench()
    u, p = str(tmp_path / "u"), str(tmp_path / "p")
    # one run per net, scored at the marks 22.5 and 45 min (a row each)
    rows = [_row("unet", 22.5, u, 0.3, 0.3, 50), _row("unet", 45, u, 0.5, 0.5, 100), _row("pixart", 22.5, p, 0.6, 0.5, 40),
            _row("pixart", 45, p, 0.8, 0.6, 80), _row("pixart", 90, str(tmp_path / "p90"), 0.95, 0.9), _row("unet", 45, u, 0.6, 0.6, 100)]
    # by folder: its row with the most steps (the newest of equals), or the one at --steps
    assert b.pick_row(rows, u) is rows[5]
    assert b.pick_row(rows, u, 50) is rows[0]
    # "best": the budget with the most nets (45, two; 22.5 too, but 45 is longer), its top row
    assert b.pick_row(rows, "best") is rows[3]
    with pytest.raises(SystemExit, match="no row of --rows names that run"):
        b.pick_row(rows, str(tmp_path / "other"))
    with pytest.raises(SystemExit, match="u at 100, u at 50"):
        b.pick_row(rows, u, 70)


def test_twin_overrides_keep_the_runs_own_and_replace_the_ema_steps_and_folder():
    b = _bench()
    row = ["data.shards=/c", "train.lr_schedule=constant", "train.max_steps=10000000", "train.log_every=1",
           "run.output_dir=/w/runs", "run.name=unet_45min", "train.seed=3", "eval.num_samples=500"]
    got = b.twin_overrides(row, 1234, Path("/t/unet_45min_posthoc_twin"), 30, 200)
    assert got == ["data.shards=/c", "train.lr_schedule=constant", "train.log_every=1", "train.seed=3",
                   "train.ema=posthoc", "train.ema_decay=0", "train.max_steps=1234", "train.posthoc_snapshot_every=30",
                   "eval.num_samples=200", "run.output_dir=/t", "run.name=unet_45min_posthoc_twin"]


def test_config_check_ignores_only_the_keys_the_twin_sets():
    b = _bench()
    fixed = {"train": {"ema": "fixed", "ema_decay": 0.999, "max_steps": 10**7, "seed": 0, "posthoc_snapshot_every": 500},
             "run": {"name": "a", "output_dir": "/w"}, "eval": {"num_samples": 500, "seed": 1234}}
    twin = {"train": {"ema": "posthoc", "ema_decay": 0, "max_steps": 99, "seed": 0, "posthoc_snapshot_every": 3},
            "run": {"name": "b", "output_dir": "/t"}, "eval": {"num_samples": 20, "seed": 1234}}
    assert b.config_differences(fixed, twin) == []
    twin["train"]["seed"], twin["eval"]["seed"] = 1, 7
    assert b.config_differences(fixed, twin) == ["eval.seed: 1234 -> 7", "train.seed: 0 -> 1"]


def test_best_length_by_the_worst_attribute_then_all():
    b = _bench()

    def figs(worst, all_, position=None):
        d = {f"eval/shapes_{k}": 0.9 for k in ("colour", "shape", "size", "count")}
        return {**d, "eval/shapes_position": worst if position is None else position, "eval/shapes_all": all_}
    curve = [figs(0.5, 0.8), figs(0.7, 0.4), figs(0.7, 0.5), figs(0.0, 0.9, position=math.nan)]
    # NaN position (no two-object prompt) is left out of the worst attribute: 0.9 there
    assert min(curve, key=b.rank_key) is curve[3]
    assert min(curve[:3], key=b.rank_key) is curve[2]
