"""`gentrain plan` with train.ema=posthoc: the EMA row holds one fp32 copy per stored profile (two by
default) where the fixed EMA holds one, sharded as that EMA is, and the snapshots' disk is counted;
against a real Trainer step and a real snapshot file."""
import json

import pytest
from safetensors.torch import load_file

from conftest import ok, run_cli
from gentrain.config import load_config
from gentrain.launch.plan.footprint import build_model
from gentrain.launch.plan.memory import format_plan, make_plan
from test_plan import measured_trainer_peak, trainer_cfg

pytestmark = pytest.mark.ema

POSTHOC = ["train.ema=posthoc", "train.ema_decay=0"]


def test_posthoc_plans_two_ema_copies_where_the_fixed_ema_plans_one():
    fixed = make_plan(load_config("flow_toy2d", ["train.ema_decay=0.999"]), 4, 1, measure=False)
    post = make_plan(load_config("flow_toy2d", POSTHOC), 4, 1, measure=False)
    three = make_plan(load_config("flow_toy2d", [*POSTHOC, "train.posthoc_sigma_rels=[0.03,0.08,0.15]"]), 4, 1,
                      measure=False)
    P = sum(n.params for n in post.model.nets)
    assert all(n.ema for n in post.model.nets)
    for s, D in (("ddp", 1), ("zero2", 1), ("zero3", 4), ("fsdp2", 4)):   # whole under DDP/ZeRO-2, /D sharded
        assert fixed.rows[s]["ema"] == 4 * P / D
        assert post.rows[s]["ema"] == 2 * 4 * P / D and three.rows[s]["ema"] == 3 * 4 * P / D, s
    assert post.rows["zero3_offload"]["ema"] == 2 * 4 * P / 4
    # the profiles lerp in place: no EMA difference tensor in the scratch (the fixed EMA's 4 bytes per param)
    assert fixed.rows["ddp"]["scratch"] == 4 * P and post.rows["ddp"]["scratch"] == 4 * P  # Adam's sqrt(v) alike
    assert fixed.rows["zero3_offload"]["scratch"] == 4 * P / 4 and post.rows["zero3_offload"]["scratch"] == 0
    assert post.ema_snapshots and fixed.ema_snapshots is None
    assert "train.ema=posthoc: 2 power-function profiles" in post.model.notes[0]


def test_posthoc_plan_adds_what_a_real_trainer_adds(tmp_path, fresh_accelerate_state):
    """The plan's totals differ between EMA kinds by what a real Trainer's measured peaks differ by
    (flow_toy2d, batch 16, one process): + one copy of the parameters over the fixed EMA, + two over
    no EMA. Measured here: exactly (1.32 and 2.65 MiB both ways); the plan before counted posthoc as no EMA."""
    from accelerate.state import AcceleratorState, GradientState

    plan, measured = {}, {}
    for kind, over in (("posthoc", POSTHOC), ("fixed", ["train.ema_decay=0.999"]), ("none", ["train.ema_decay=0"])):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = trainer_cfg(tmp_path / kind, "flow_toy2d", "train.batch_size=16", *over)
        plan[kind] = make_plan(cfg, 1, 1, measure=False).rows["ddp"]["total"]   # activations alike
        measured[kind] = measured_trainer_peak(cfg, tmp_path / kind / "run")
    copy = 4 * sum(n.params for n in build_model(trainer_cfg(tmp_path, "flow_toy2d")).nets)
    for other, copies in (("fixed", 1), ("none", 2)):
        p, m = plan["posthoc"] - plan[other], measured["posthoc"] - measured[other]
        print(f"\nposthoc - {other}: plan {p / 2**20:.3f} MiB, measured {m / 2**20:.3f} MiB")
        assert abs(p - copies * copy) <= 0.01 * copy and abs(m - copies * copy) <= 0.02 * copy, (other, p, m, copy)


def test_snapshot_disk_matches_the_files_a_run_writes(tmp_path):
    over = [*POSTHOC, "train.max_steps=5", "train.posthoc_snapshot_every=2"]
    plan = make_plan(load_config("flow_toy2d", over), 1, 1, measure=False)
    snaps = json.loads(json.dumps(plan.to_json()))["ema_snapshots"]
    ok(run_cli("train", "flow_toy2d", *over, "train.sample_every=0", "train.checkpoint_every=100",
               "train.progress_bar=false", "eval.num_samples=64", "train.batch_size=32",
               f"run.output_dir={tmp_path}", "run.name=r"))
    files = sorted((tmp_path / "r" / "ema_snapshots").glob("step_*.safetensors"))
    assert [f.name for f in files] == ["step_2.safetensors", "step_4.safetensors", "step_5.safetensors"]
    each = {sum(v.numel() * v.element_size() for v in load_file(str(f)).values()) for f in files}
    assert snaps == {"count": 3, "bytes_each": each.pop(), "bytes_total": 3 * snaps["bytes_each"]} and not each
    assert "snapshots on disk (RUN/ema_snapshots, never pruned): 3 x" in format_plan(plan)
