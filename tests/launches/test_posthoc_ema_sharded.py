"""Post-hoc EMA under sharding (CPU processes, gloo): the profiles follow each rank's share of the
weights (DeepSpeed ZeRO-2: the fp32 master fragment; ZeRO-3: the padded 1-D partition; FSDP2: the
DTensor shard), and the snapshots and `gentrain ema`'s reconstruction equal a DDP run's; elastic
ZeRO-2 and ZeRO-3 resumes (2 processes -> 1) and an FSDP2 stop/resume keep the profiles."""
import json

import pytest
from safetensors.torch import load_file

from conftest import ok, run_cli
from test_deepspeed import ddp, launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.ema]

ARGS = ["train", "flow_toy2d", "train.ema=posthoc", "train.ema_decay=0", "train.posthoc_snapshot_every=2",
        "train.max_steps=6", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=100",
        "train.progress_bar=false", "eval.num_samples=200"]


def per(n):
    return [f"train.num_processes={n}", f"train.batch_size={128 // n}"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def snap(run, step):
    return load_file(str(run / "ema_snapshots" / f"step_{step}.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("posthoc_ddp")
    ok(ddp(*ARGS, *per(2), f"run.output_dir={root}", "run.name=ddp"))
    ok(run_cli("ema", str(root / "ddp"), "--sigma-rel", "0.08", "--out", str(root / "e_ddp")))
    return root


def reconstruction_diff(ddp_root, run, tmp_path):
    ok(run_cli("ema", str(run), "--sigma-rel", "0.08", "--out", str(tmp_path / "e")))
    return max_diff(load_file(str(ddp_root / "e_ddp" / "ema_velocity.safetensors")),
                    load_file(str(tmp_path / "e" / "ema_velocity.safetensors")))


@pytest.mark.deepspeed
def test_zero2_profiles_and_reconstruction_equal_ddp_and_survive_an_elastic_resume(ddp_run, tmp_path):
    args = [*ARGS, f"run.output_dir={tmp_path}"]
    ok(launch("zero2", *args, *per(2), "run.name=z", "--stop-at", "3"))
    r = ok(launch("zero2", *args, *per(1), "run.name=z", "--resume", "auto", nproc=1))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    before = max_diff(snap(ddp_run / "ddp", 2), snap(tmp_path / "z", 2))   # ZeRO-2 on 2 processes
    after = max_diff(snap(ddp_run / "ddp", 6), snap(tmp_path / "z", 6))    # after the 2 -> 1 resume
    rec = reconstruction_diff(ddp_run, tmp_path / "z", tmp_path)
    print(f"\nZeRO-2 vs DDP: snapshot step 2 {before:.3g}; after the 2 -> 1 resume: step 6 {after:.3g}, "
          f"reconstruction at 0.08 {rec:.3g}")
    assert before <= 1e-6, before
    assert after <= 5e-5 and rec <= 5e-5   # test_deepspeed's layout tolerance for an elastic resume
    state = json.loads((tmp_path / "z" / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["ema"]["velocity"]["t"] == 6


@pytest.mark.fsdp
def test_fsdp2_profiles_and_reconstruction_equal_ddp_through_a_stop_and_resume(ddp_run, tmp_path):
    args = [*ARGS, *per(2), f"run.output_dir={tmp_path}", "run.name=f"]
    ok(launch("fsdp2", *args, "--stop-at", "3"))
    r = ok(launch("fsdp2", *args, "--resume", "auto"))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    diffs = [max_diff(snap(ddp_run / "ddp", s), snap(tmp_path / "f", s)) for s in (2, 4, 6)]
    rec = reconstruction_diff(ddp_run, tmp_path / "f", tmp_path)
    print(f"\nFSDP2 vs DDP: snapshots {', '.join(f'{d:.3g}' for d in diffs)}; reconstruction at 0.08 {rec:.3g}")
    assert max(diffs) <= 1e-5 and rec <= 1e-5   # test_fsdp2's tolerance against DDP


@pytest.mark.deepspeed
def test_zero3_profiles_and_reconstruction_equal_ddp_through_an_elastic_resume(ddp_run, tmp_path):
    """ZeRO-3: the profiles follow each rank's 1-D padded partition of the fp32 master (p.ds_id);
    stopped on 2 processes and resumed on 1, its snapshots and reconstruction match DDP's."""
    args = [*ARGS, f"run.output_dir={tmp_path}"]
    ok(launch("zero3", *args, *per(2), "run.name=z3", "--stop-at", "3"))
    r = ok(launch("zero3", *args, *per(1), "run.name=z3", "--resume", "auto", nproc=1))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    diffs = [max_diff(snap(ddp_run / "ddp", s), snap(tmp_path / "z3", s)) for s in (2, 4, 6)]
    rec = reconstruction_diff(ddp_run, tmp_path / "z3", tmp_path)
    print(f"\nZeRO-3 vs DDP: snapshots {', '.join(f'{d:.3g}' for d in diffs)} (steps 2 on 2 processes; "
          f"4, 6 after the 2 -> 1 resume); reconstruction at 0.08 {rec:.3g}")
    assert diffs[0] <= 1e-6, diffs
    assert max(diffs) <= 5e-5 and rec <= 5e-5   # test_deepspeed's layout tolerance for an elastic resume
    state = json.loads((tmp_path / "z3" / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["ema"]["velocity"]["t"] == 6
