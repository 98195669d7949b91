"""gentrain/launch/slurm/gentrain.sbatch submitted with `sbatch` to a real SLURM (tests/slurm_cluster.py: munged,
slurmctld and two slurmd, nodes n1 and n2 on 127.0.0.1, no GPUs): a 2-node DDP run to the end, a 2-node
ZeRO-2 run that `scancel --signal=USR1 --batch` stops, requeues and resumes to the end, and a job signalled
before its first checkpoint, which is not requeued. Skipped, naming the apt-get command, where SLURM is absent."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gentrain.launch import accelerate_config_path
from gentrain import checkpoint as ckpt

from conftest import REPO, read_metrics
from slurm_cluster import cluster  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.slurm]
SBATCH = REPO / "gentrain" / "launch" / "slurm" / "gentrain.sbatch"
SMALL = "train.progress_bar=false train.batch_size=64 train.sample_every=0 eval.num_samples=200 train.log_every=10"


def sbatch(cluster, tmp_path: Path, name: str, overrides: str, config: str = "multi_node") -> str:
    """Submit the template as a user would on a CPU partition; returns the job id."""
    env = dict(cluster.env, CONFIG="flow_toy2d", PYTHON=sys.executable, DS_ACCELERATOR="cpu",
               ACCELERATE_CONFIG=str(accelerate_config_path(config)), PYTHONPATH=str(REPO),
               OVERRIDES=f"run.output_dir={tmp_path} run.name={name} {SMALL} {overrides}")
    cmd = ["sbatch", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--job-name={name}",
           f"--chdir={tmp_path}", str(SBATCH)]
    # submitted from the test's folder: the job's state (STATE_DIR) lives under SLURM_SUBMIT_DIR
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    print(f"\n$ {' '.join(cmd[:-1])} gentrain.sbatch\n{r.stdout.strip()}")
    return re.fullmatch(r"Submitted batch job (\d+)\n", r.stdout)[1]


def output(tmp_path: Path, name: str, job: str) -> str:
    path = tmp_path / f"{name}-{job}.out"
    return path.read_text() if path.exists() else ""


def wait_for(cluster, job: str, ended, timeout: float, what: str, tmp_path: Path, name: str) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = cluster.job(job)
        if ended(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=cluster.env, timeout=30)
    raise AssertionError(f"job {job}: no {what} after {timeout:.0f} s ({cluster.job(job).get('JobState')}): "
                         + output(tmp_path, name, job)[-4000:])


def finished(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def loss_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss/main" in r]


def test_ddp_on_two_nodes_to_the_end(cluster, tmp_path):
    job = sbatch(cluster, tmp_path, "ddp", "train.max_steps=20 train.checkpoint_every=10")
    info = wait_for(cluster, job, finished, 240, "end", tmp_path, "ddp")
    out = output(tmp_path, "ddp", job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out[-4000:]
    assert re.search(rf"job {job} \(restart 0\): 2 node\(s\) x 1 process\(es\), head n1 at 127.0.0.1:\d+", out), out
    assert ckpt.load_json(tmp_path / "ddp" / "eval.json")["step"] == 20
    assert loss_steps(tmp_path / "ddp") == [10, 20]
    last = ckpt.find_resume_checkpoint(tmp_path / "ddp" / "checkpoints")
    assert ckpt.load_json(last / "trainer_state.json")["num_processes"] == 2


def test_zero2_on_two_nodes_usr1_saves_requeues_and_resumes_to_the_end(cluster, tmp_path):
    steps = 100
    job = sbatch(cluster, tmp_path, "z2", f"train.max_steps={steps} train.checkpoint_every=50", config="zero2")
    metrics = tmp_path / "z2" / "metrics.jsonl"
    wait_for(cluster, job, lambda info: finished(info) or (metrics.exists() and metrics.read_text().strip()),
             240, "first metrics", tmp_path, "z2")
    # what `#SBATCH --signal=B:USR1@S` does S seconds before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=30)
    info = wait_for(cluster, job, lambda info: finished(info) and info.get("Restarts") == "1", 300,
                    "requeued run to the end", tmp_path, "z2")
    out = output(tmp_path, "z2", job)
    assert info["JobState"] == "COMPLETED", out[-4000:]
    stop = re.search(r"gentrain: stopped by signal SIGUSR1 at step (\d+); checkpoint saved: ([^;\s]+);", out)
    assert stop, out[-4000:]
    step = int(stop[1])
    assert 0 < step < steps and f"requeueing job {job} (checkpoint of step {step} saved)" in out
    assert f"job {job} (restart 1)" in out and f"gentrain: resumed from {stop[2]} (step {step})" in out
    assert loss_steps(tmp_path / "z2") == list(range(10, steps + 1, 10))  # each step once: none lost or redone
    assert ckpt.load_json(tmp_path / "z2" / "eval.json")["step"] == steps
    assert ckpt.load_json(Path(stop[2]) / "trainer_state.json")["backend"] == "deepspeed"


def test_a_job_signalled_before_its_first_checkpoint_is_not_requeued(cluster, tmp_path):
    job = sbatch(cluster, tmp_path, "early", "train.max_steps=20 train.checkpoint_every=10")
    # the script's first line is printed once its traps are set, seconds before the launchers start
    wait_for(cluster, job, lambda info: finished(info) or f"job {job} (restart 0)" in output(tmp_path, "early", job),
             120, "start", tmp_path, "early")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=30)
    info = wait_for(cluster, job, finished, 120, "end", tmp_path, "early")
    out = output(tmp_path, "early", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, out[-4000:])
    assert f"not requeueing job {job}: no checkpoint was saved in this allocation" in out, out[-4000:]
    assert ckpt.find_resume_checkpoint(tmp_path / "early" / "checkpoints", log=lambda m: None) is None
