"""gentrain/launch/slurm/gentrain.sbatch run for real with `bash`, stub srun/scontrol first on PATH
(tests/slurm_stubs: two local "nodes" on 127.0.0.1) and the variables sbatch would set."""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gentrain import checkpoint as ckpt

from conftest import REPO, cli_env, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SBATCH = REPO / "gentrain" / "launch" / "slurm" / "gentrain.sbatch"
STUBS = Path(__file__).parents[1] / "slurm_stubs"


def job_env(tmp_path: Path, overrides: str) -> dict:
    """What sbatch gives the batch script of a 2-node job, plus the template's settings."""
    while True:  # a job id whose derived port (20000 + id % 10000) is free here
        job_id = random.randrange(100000, 999999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 10000))
                break
            except OSError:
                continue
    return cli_env(PATH=f"{STUBS}:{os.environ['PATH']}", STUB_CALLS=str(tmp_path / "calls.txt"),
                   SLURM_JOB_ID=str(job_id), SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2",
                   SLURM_NODEID="0", SLURM_PROCID="0", SLURM_SUBMIT_DIR=str(tmp_path),
                   CONFIG="flow_toy2d", GPUS_PER_NODE="1", PYTHON=sys.executable,
                   OVERRIDES=f"run.output_dir={tmp_path} train.progress_bar=false train.batch_size=64 "
                             f"train.sample_every=0 eval.num_samples=200 {overrides}")


def start(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SBATCH)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().splitlines()


def test_sbatch_trains_two_nodes_to_the_end(tmp_path):
    env = job_env(tmp_path, "run.name=full train.max_steps=20 train.log_every=10 train.checkpoint_every=10")
    log = tmp_path / "job.log"
    rc = finish(start(env, log), timeout=240)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    made = (tmp_path / "calls.txt").read_text()
    assert made.startswith("scontrol show hostnames 127.0.0.1,127.0.0.2\nscontrol show node 127.0.0.1\n"
                           "srun --ntasks-per-node=1 "), made
    assert "requeue" not in made
    assert f"head 127.0.0.1 at 127.0.0.1:{20000 + int(env['SLURM_JOB_ID']) % 10000}" in out
    run = tmp_path / "full"
    assert ckpt.load_json(run / "eval.json")["step"] == 20
    last = ckpt.find_resume_checkpoint(run / "checkpoints")
    assert ckpt.load_json(last / "trainer_state.json")["num_processes"] == 2
    assert {p.name for p in last.glob("data_rank*.json")} == {"data_rank0.json", "data_rank1.json"}


def test_usr1_saves_requeues_and_the_requeued_job_finishes(tmp_path):
    env = job_env(tmp_path, "run.name=rq train.max_steps=200 train.log_every=10 train.checkpoint_every=100 "
                            "data.num_workers=1")
    log = tmp_path / "job.log"
    proc = start(env, log)
    metrics = tmp_path / "rq" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@S` does S seconds before the limit
    rc = finish(proc, timeout=120)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    stop = re.search(r"gentrain: stopped by signal SIGUSR1 at step (\d+); checkpoint saved: (\S+); "
                     r"continue with --resume auto", out)
    assert stop, out[-4000:]
    step, path = int(stop[1]), Path(stop[2])
    assert 0 < step < 200 and path == tmp_path / "rq" / "checkpoints" / f"step_{step}"
    assert ckpt.check_checkpoint(path) is None and ckpt.find_resume_checkpoint(path.parent) == path
    assert calls(tmp_path)[-1] == f"scontrol requeue {env['SLURM_JOB_ID']}"
    assert "eval.json" not in os.listdir(tmp_path / "rq")

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: same job id, same script, same port
    log2 = tmp_path / "job2.log"
    rc = finish(start(env, log2), timeout=240)
    out2 = log2.read_text()
    assert rc == 0, out2[-4000:]
    assert f"gentrain: resumed from {path} (step {step})" in out2
    assert "requeue" not in calls(tmp_path)[-1]
    assert ckpt.load_json(tmp_path / "rq" / "eval.json")["step"] == 200
    steps = [r["step"] for r in read_metrics(tmp_path / "rq") if "loss/main" in r]
    assert steps[-1] == 200 and steps == sorted(steps) and len(steps) == len(set(steps))


def test_an_unreachable_head_fails_in_one_line_naming_its_address_and_port(tmp_path):
    env = job_env(tmp_path, "run.name=rdzv train.max_steps=20")
    env.update(MAIN_PROCESS_IP="192.0.2.1", RDZV_TIMEOUT_S="3")  # TEST-NET-1: nothing answers there
    log = tmp_path / "job.log"
    rc = finish(start(env, log), timeout=120)
    out = log.read_text()
    port = 20000 + int(env["SLURM_JOB_ID"]) % 10000
    assert rc != 0 and "requeue" not in calls(tmp_path)[-1], out[-4000:]
    assert (f"gentrain.sbatch: error: node 1: no rendezvous at 192.0.2.1:{port} (head node 127.0.0.1) after 3 s; "
            "set MAIN_PROCESS_IP to an address of 127.0.0.1 that this node reaches") in out, out[-4000:]


FAKE_LAUNCH = """#!/usr/bin/env bash
# stands in for `python -m accelerate.commands.launch ... gentrain train`: on SIGUSR1 node 0 "saves" step
# $FAKE_STEP (what gentrain's rank 0 appends to $GENTRAIN_SAVED_FILE) unless FAKE_STEP is empty
trap '[ "$SLURM_NODEID" = 0 ] && [ -n "$FAKE_STEP" ] && echo "$FAKE_STEP /runs/x/checkpoints/step_$FAKE_STEP" \\
  >> "$GENTRAIN_SAVED_FILE"; exit 138' USR1
touch "$FAKE_READY.$SLURM_NODEID"
while :; do sleep 0.05; done
"""


def test_requeues_need_a_saved_checkpoint_and_stop_after_max_idle_requeues_without_progress(tmp_path):
    """The script's requeue rule alone (a stand-in launcher, one allocation a second): saved with progress ->
    requeue; saved at the same step -> requeue while MAX_IDLE_REQUEUES allows; nothing saved -> no requeue."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_LAUNCH)
    fake.chmod(0o755)
    env = job_env(tmp_path, "")
    env.update(PYTHON=str(fake), ACCELERATE_CONFIG="unused", MAX_IDLE_REQUEUES="1", RDZV_TIMEOUT_S="600",
               FAKE_READY=str(tmp_path / "ready"), MAIN_PROCESS_IP="192.0.2.1")  # node 1 waits at the probe
    job = env["SLURM_JOB_ID"]

    def allocation(step: str) -> str:
        for f in tmp_path.glob("ready.*"):
            f.unlink()
        n = len(list(tmp_path.glob("alloc*")))
        log = tmp_path / f"alloc{n}.log"
        proc = start(dict(env, FAKE_STEP=step, SLURM_RESTART_COUNT=str(n)), log)
        deadline = time.time() + 30
        while not (tmp_path / "ready.0").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        finish(proc, timeout=30)
        return log.read_text()

    state = tmp_path / ".gentrain-slurm"  # an earlier job's files under the same id (a controller reset
    state.mkdir()                           # hands ids out again): the first allocation must not read them
    (state / f"{job}.saved").write_text("90 /earlier/job/checkpoint\n")
    (state / f"{job}.idle").write_text("5\n")
    assert f"requeueing job {job} (checkpoint of step 50 saved)" in allocation("50")  # progress
    assert f"requeueing job {job} (checkpoint of step 50 saved)" in allocation("50")  # idle 1 of 1
    out = allocation("50")                                                            # idle 2: no more
    assert f"not requeueing job {job}: 2 allocations in a row saved no step after 50 (MAX_IDLE_REQUEUES=1)" in out
    assert f"requeueing job {job} (checkpoint of step 60 saved)" in allocation("60")  # progress again
    out = allocation("")                                                              # nothing saved
    assert f"not requeueing job {job}: no checkpoint was saved in this allocation" in out, out
    assert [c for c in calls(tmp_path) if "requeue" in c] == [f"scontrol requeue {job}"] * 3
