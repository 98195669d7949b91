"""Two "nodes" on loopback: two `accelerate launch` runs (--num_machines 2, one process each) with the
shipped multi_node.yaml (a SIGKILLed rank, a SIGKILLed job, and `--resume auto` to the end) and with the
shipped zero2.yaml / zero3.yaml (a SIGTERM stop that saves, `--resume auto` to the end, and DeepSpeed's own
tools on the last checkpoint: `zero_to_fp32` and `ds_to_universal` with no extra flags give exactly gentrain's
model.safetensors and the Adam moments of its optimizer_NET.safetensors)."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from gentrain.launch import accelerate_config_path
from gentrain import checkpoint as ckpt

from conftest import REPO, cli_env, free_port, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
MAX_STEPS, LOG_EVERY, CKPT_EVERY, BATCH = 200, 10, 20, 64


class Job:
    """Two launches of one 2-machine job on 127.0.0.1, each in its own session (so it can be killed)."""

    def __init__(self, run_root: Path, name: str, *extra: str, config: str = "multi_node", max_steps: int = MAX_STEPS,
                 **env: str):
        self.run_dir = run_root / name
        port = free_port()
        self.procs, self.logs = [], []
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(accelerate_config_path(config)), "--num_machines", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   "--num_processes", "2", "-m", "gentrain", "train", "flow_toy2d", "train.num_processes=2",
                   f"train.max_steps={max_steps}", f"train.log_every={LOG_EVERY}",
                   f"train.checkpoint_every={CKPT_EVERY}", "train.sample_every=0", "train.progress_bar=false",
                   f"train.batch_size={BATCH}", "eval.num_samples=200", f"run.output_dir={run_root}",
                   f"run.name={name}", *extra]
            log = run_root / f"{name}.node{rank}.{len(list(run_root.glob(f'{name}.node{rank}.*')))}.log"
            self.logs.append(log)
            self.procs.append(subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=cli_env(**env),
                                               cwd=REPO, start_new_session=True))

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        finally:
            self.kill()

    def wait_for_checkpoint(self, newer_than: int = 0, timeout: float = 150) -> Path:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = ckpt.find_resume_checkpoint(self.run_dir / "checkpoints", log=lambda msg: None)
            if found is not None and ckpt.step_of(found) > newer_than:
                return found
            assert all(p.poll() is None for p in self.procs), self.output(0)[-3000:]
            time.sleep(0.05)
        raise AssertionError("no checkpoint appeared: " + self.output(0)[-3000:])

    def workers(self, rank: int) -> list[psutil.Process]:
        return [c for c in psutil.Process(self.procs[rank].pid).children(recursive=True)
                if "gentrain" in " ".join(c.cmdline()) and c.environ().get("RANK") == str(rank)]

    def kill(self) -> None:
        """SIGKILL every process of the job: launchers and workers (torchrun starts each worker in its own session)."""
        for p in self.procs:
            if p.poll() is None:
                for c in psutil.Process(p.pid).children(recursive=True):
                    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                        os.killpg(c.pid, signal.SIGKILL)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def loss_rows(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if "loss/main" in r}


def check_resumed_to_the_end(run_dir: Path, resumed_from: int, rows_before: int, max_steps: int = MAX_STEPS) -> None:
    rows = read_metrics(run_dir)
    after = loss_rows(rows[rows_before:])
    assert sorted(after) == list(range(resumed_from + LOG_EVERY, max_steps + 1, LOG_EVERY))
    assert after[max_steps]["kimg"] == pytest.approx(max_steps * BATCH * 2 / 1000)  # images of both ranks, all steps
    first_loss = {}
    for r in rows:  # a step logged twice (by a killed job, then by the job resumed before it) has the same loss
        if "loss/main" in r:
            assert first_loss.setdefault(r["step"], r["loss/main"]) == r["loss/main"], r["step"]
    assert "eval/energy_distance" in rows[-1] and rows[-1]["step"] == max_steps
    assert ckpt.step_of(ckpt.find_resume_checkpoint(run_dir / "checkpoints")) == max_steps


def valid_checkpoint(run_dir: Path) -> Path:
    found = ckpt.find_resume_checkpoint(run_dir / "checkpoints")
    assert found is not None and ckpt.check_checkpoint(found) is None
    return found


def test_a_killed_rank_then_a_killed_job_and_resume_to_the_end(tmp_path):
    """One run through three 2-node jobs (three launches, not four: startup is most of the time here)."""
    # 1. SIGKILL rank 1 (node 1's only worker) mid-training: the whole job ends, non-zero, within seconds
    job = Job(tmp_path, "mn")
    job.wait_for_checkpoint()
    (worker,) = job.workers(1)
    worker.kill()
    t0 = time.monotonic()
    codes = job.wait(timeout=120)
    took = time.monotonic() - t0
    print(f"\nkilled rank 1: both launchers exited {took:.1f} s later with {codes}")
    assert all(c != 0 for c in codes) and took < 60, (codes, took)
    assert "rank 0: a peer process stopped answering" in job.output(0), job.output(0)[-3000:]

    # 2. resume from the last complete checkpoint, then SIGKILL the whole job (a lost allocation) after its
    #    next checkpoint: launchers and workers of both nodes at once, no chance to save
    first = valid_checkpoint(job.run_dir)
    job = Job(tmp_path, "mn", "--resume", "auto")
    job.wait_for_checkpoint(newer_than=ckpt.step_of(first))
    job.kill()
    assert f"gentrain: resumed from {first} (step {ckpt.step_of(first)})" in job.output(0)
    second = valid_checkpoint(job.run_dir)
    rows_before = len(read_metrics(job.run_dir))

    # 3. resume again: both nodes continue from there to max_steps
    job = Job(tmp_path, "mn", "--resume", "auto")
    assert job.wait(timeout=240) == [0, 0], job.output(0)[-3000:] + job.output(1)[-3000:]
    assert f"gentrain: resumed from {second} (step {ckpt.step_of(second)})" in job.output(0)
    check_resumed_to_the_end(job.run_dir, ckpt.step_of(second), rows_before)


@pytest.mark.deepspeed
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_on_two_nodes_stops_resumes_and_deepspeeds_tools_read_the_checkpoint(tmp_path, config):
    """The shipped DeepSpeed file with --num_machines 2: one torchrun per node, a 2-process world (no pdsh)."""
    steps = 40
    job = Job(tmp_path, "ds", config=config, max_steps=steps, DS_ACCELERATOR="cpu")
    job.wait_for_checkpoint(timeout=240)
    for p in job.procs:  # what a scheduler's stop does: SIGTERM to each node's launcher, forwarded to its worker
        p.send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    out = job.output(0)
    assert "expects 2 process(es)" not in out and not (REPO / ".deepspeed_env").exists(), out[-3000:]
    stop = re.search(r"gentrain: stopped by signal SIGTERM at step (\d+); checkpoint saved: ([^;\s]+);", out)
    assert stop, out[-3000:] + job.output(1)[-3000:]
    saved = valid_checkpoint(job.run_dir)
    assert saved == Path(stop[2]) and ckpt.load_json(saved / "trainer_state.json")["num_processes"] == 2
    assert {p.name for p in saved.glob("data_rank*.json")} == {"data_rank0.json", "data_rank1.json"}

    job = Job(tmp_path, "ds", "--resume", "auto", config=config, max_steps=steps, DS_ACCELERATOR="cpu")
    assert job.wait(timeout=240) == [0, 0], job.output(0)[-3000:] + job.output(1)[-3000:]
    assert f"gentrain: resumed from {saved} (step {ckpt.step_of(saved)})" in job.output(0)
    rows = read_metrics(job.run_dir)
    logged = [r["step"] for r in rows if "loss/main" in r]  # each step once: none lost, none trained twice
    assert logged == list(range(LOG_EVERY, steps + 1, LOG_EVERY)), logged
    assert loss_rows(rows)[steps]["kimg"] == pytest.approx(steps * BATCH * 2 / 1000)
    last = valid_checkpoint(job.run_dir)
    assert "eval/energy_distance" in rows[-1] and ckpt.step_of(last) == steps
    check_deepspeed_tools_read(last, tmp_path)


def tool(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300,
                       env=cli_env(DS_ACCELERATOR="cpu"), cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def check_deepspeed_tools_read(last: Path, tmp_path: Path) -> None:
    """zero_to_fp32 from CKPT/deepspeed and from CKPT/deepspeed/NET (through the `latest` files gentrain writes),
    ds_to_universal (through the universal-checkpoint version in the engine's client state): exact."""
    ours = load_file(str(last / "model.safetensors"))
    (net,) = [p.name for p in (last / "deepspeed").iterdir() if p.is_dir()]
    assert (last / "deepspeed" / "latest").read_text() == net
    for src, out in ((last / "deepspeed", tmp_path / "fp32"), (last / "deepspeed" / net, tmp_path / "fp32_net")):
        tool("deepspeed.utils.zero_to_fp32", str(src), str(out), "--safe_serialization")
        theirs = load_file(str(out / "model.safetensors"))
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours), src

    tool("deepspeed.checkpoint.ds_to_universal", "--input_folder", str(last / "deepspeed" / net),
         "--output_folder", str(tmp_path / "universal"))
    adam = load_file(str(last / f"optimizer_{net}.safetensors"))

    def universal(name: str, file: str, shape: torch.Size) -> torch.Tensor:
        t = torch.load(tmp_path / "universal" / "zero" / name / file, weights_only=True)  # tensors only
        return (t["param"] if isinstance(t, dict) else t).view(shape)  # ZeRO-3 writes bare flat tensors

    for k, v in ours.items():
        assert torch.equal(universal(k, "fp32.pt", v.shape), v), k
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(universal(k, f"{moment}.pt", v.shape), adam[f"{k}::{moment}"]), (k, moment)
