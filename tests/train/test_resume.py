"""Checkpoints and resume: bitwise-equal continuation, kill during save, invalid checkpoints,
and never overwriting an existing run."""
import json
import sys

import pytest

from conftest import ok, read_metrics, run_cli

BASE = ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=100", "train.sample_every=0",
        "train.progress_bar=false", "eval.num_samples=200", "train.batch_size=128", "train.ema_decay=0.9",
        "train.warmup_steps=2", "train.lr_schedule=cosine"]


def losses(run_dir):
    return {r["step"]: r["loss/main"] for r in read_metrics(run_dir) if "loss/main" in r}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_bitwise_equal_losses(tmp_path, workers):
    args = ["train", "flow_toy2d", *BASE, f"data.num_workers={workers}", f"run.output_dir={tmp_path}"]
    r = run_cli(*args, "run.name=straight")
    ok(r)
    r = run_cli(*args, "run.name=split", "--stop-at", "3")
    ok(r)
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] == ["step_3"]
    r = run_cli(*args, "run.name=split", "--resume", "auto")
    ok(r)
    assert "resumed from" in r.stderr and "step_3" in r.stderr
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert split[step] == straight[step], (step, split[step], straight[step])  # bitwise: exact floats
    # and the final weights agree too
    a = (tmp_path / "straight" / "checkpoints" / "step_6" / "model.safetensors").read_bytes()
    b = (tmp_path / "split" / "checkpoints" / "step_6" / "model.safetensors").read_bytes()
    assert a == b


KILL_IN_SAVE = """
import os, sys
import gentrain.checkpoint as ckpt
real = ckpt.write_manifest
def die_on_second(d, _n=[0]):
    _n[0] += 1
    if _n[0] == 2:
        os._exit(9)  # the process dies after writing the files, before the manifest
    real(d)
ckpt.write_manifest = die_on_second
from gentrain.launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    args = ["train", "flow_toy2d", *BASE, "train.checkpoint_every=2", f"run.output_dir={tmp_path}", "run.name=k"]
    r = run_cli(sys.executable, "-c", KILL_IN_SAVE, *args, module=False)
    assert r.returncode == 9, r.stderr[-2000:]
    ck = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [".tmp-step_4", "step_2"]
    r = run_cli(*args, "--resume", "auto")
    ok(r)
    assert "resumed from" in r.stderr and "step_2" in r.stderr
    assert "invalid" not in r.stderr  # the half-written save is never considered
    assert sorted(p.name for p in ck.iterdir()) == ["step_2", "step_4", "step_6"]


def test_truncated_checkpoint_is_reported_and_skipped(tmp_path):
    args = ["train", "flow_toy2d", *BASE, "train.checkpoint_every=2", f"run.output_dir={tmp_path}", "run.name=t"]
    r = run_cli(*args, "--stop-at", "4")
    ok(r)
    newest = tmp_path / "t" / "checkpoints" / "step_4"
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated on disk
    # an explicit resume from it is an error that names the file; nothing changes
    r = run_cli(*args, "--resume", str(newest))
    assert r.returncode == 2
    assert "model.safetensors has 100 bytes" in r.stderr and "Traceback" not in r.stderr
    # auto skips it, by path, for the previous valid one
    r = run_cli(*args, "--resume", "auto")
    ok(r)
    assert f"skipping invalid checkpoint {newest}" in r.stderr
    assert "resumed from" in r.stderr and "step_2" in r.stderr


def test_existing_run_is_never_overwritten(tmp_path):
    args = ["train", "flow_toy2d", *BASE, "train.max_steps=2", f"run.output_dir={tmp_path}", "run.name=e"]
    assert run_cli(*args).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "e").rglob("*") if p.is_file()}
    r = run_cli(*args)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--resume auto" in r.stderr
    after = {p: p.read_bytes() for p in (tmp_path / "e").rglob("*") if p.is_file()}
    assert before == after
    # resuming with a changed model is refused, naming the key
    r = run_cli(*args, "model.hidden=64", "--resume", "auto")
    assert r.returncode == 2 and "config key 'model.hidden' differs" in r.stderr


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("train", "flow_toy2d", *BASE, f"run.output_dir={blocker}", "run.name=x")
    assert r.returncode == 2 and "is not writable" in r.stderr and str(blocker) in r.stderr
    assert blocker.read_text() == "not a directory"


def test_rng_restore_failure_is_an_error(tmp_path):
    args = ["train", "flow_toy2d", *BASE, f"run.output_dir={tmp_path}", "run.name=r"]
    assert run_cli(*args, "--stop-at", "3").returncode == 0
    ck = tmp_path / "r" / "checkpoints" / "step_3"
    (ck / "rng_rank0.json").write_text(json.dumps({"python": [], "numpy": []}))
    from gentrain.checkpoint import write_manifest  # re-sign it: the file is valid, the state is not
    (ck / "manifest.json").unlink()
    write_manifest(ck)
    r = run_cli(*args, "--resume", "auto")
    assert r.returncode == 2 and "could not restore the RNG state" in r.stderr
