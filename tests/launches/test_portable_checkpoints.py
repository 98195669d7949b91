"""Portable checkpoints: a checkpoint written under one backend resumes under another, on another
process count, from gentrain's whole files (model*.safetensors and the whole optimizer state:
DeepSpeed's optimizer_NET.safetensors, DDP's / FSDP2's optimizer*.bin), with the data position
remapped as the elastic resume does. flow_toy2d draws its global batch whole (any layout reads the
same data), so each ends where one uninterrupted DDP process ends, within the 5e-5 layout
tolerance of the ZeRO elastic tests (test_deepspeed); a lost or mis-cut optimizer state moves the
weights by ~lr = 2e-3 (measured 2.6e-3 with the optimizer state left out of ZeRO-2 -> DDP; 3e-8 to
6e-8 as it is). Same-backend resumes: test_deepspeed (ZeRO elastic), test_fsdp2 (DDP <-> FSDP2).
"""
import pytest

from conftest import ok, run_cli
from test_deepspeed import TOY, final, launch, max_diff

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.deepspeed, pytest.mark.fsdp]

ARGS = ["train", "flow_toy2d", *TOY, "train.max_steps=6"]


def per(n: int) -> list[str]:
    return [f"train.num_processes={n}", f"train.batch_size={128 // n}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted DDP process: where every resumed run must end."""
    out = tmp_path_factory.mktemp("straight")
    ok(run_cli(*ARGS, *per(1), f"run.output_dir={out}", "run.name=straight"))
    return out / "straight"


def _check(straight, run, label):
    for f in ("model.safetensors", "ema_velocity.safetensors"):
        diff = max_diff(final(straight, f), final(run, f))
        print(f"\n{label} {f}: max |resumed - straight| {diff:.3g}")
        assert diff <= 5e-5, (label, f, diff)


def test_zero2_on_two_processes_resumes_under_ddp_on_one(straight, tmp_path):
    args = [*ARGS, f"run.output_dir={tmp_path}", "run.name=z2_ddp"]
    ok(launch("zero2", *args, *per(2), "--stop-at", "3"))
    r = ok(run_cli(*args, *per(1), "--resume", "auto"))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    _check(straight, tmp_path / "z2_ddp", "zero2 (2) -> ddp (1)")


def test_fsdp2_on_two_processes_resumes_under_zero3_on_one(straight, tmp_path):
    args = [*ARGS, f"run.output_dir={tmp_path}", "run.name=fsdp_z3"]
    ok(launch("fsdp2", *args, *per(2), "--stop-at", "3"))
    r = ok(launch("zero3", *args, *per(1), "--resume", "auto", nproc=1))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    _check(straight, tmp_path / "fsdp_z3", "fsdp2 (2) -> zero3 (1)")


def test_zero2_resumes_under_zero3_on_the_same_process_count(straight, tmp_path):
    """DeepSpeed's own files expect the stage that wrote them (ZeRO-3 failed an assertion inside
    DeepSpeed on ZeRO-2's): the stage recorded in optimizer_NET.safetensors sends it through the whole files."""
    args = [*ARGS, f"run.output_dir={tmp_path}", "run.name=z2_z3"]
    ok(launch("zero2", *args, *per(2), "--stop-at", "3"))
    r = ok(launch("zero3", *args, *per(2), "--resume", "auto"))
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    _check(straight, tmp_path / "z2_z3", "zero2 (2) -> zero3 (2)")
