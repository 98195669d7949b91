"""Real multi-process launches on CPU: the world-size guard, a 2-process run, a frozen peer."""
import signal
import time

import psutil
import pytest

from gentrain.errors import GentrainError
from gentrain.distributed.core import check_world_size

from conftest import cli_env, free_port, ok, read_metrics, REPO, run_cli

pytestmark = pytest.mark.slow
ACCEL = ["-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no"]
SMALL = ["train.progress_bar=false", "eval.num_samples=200", "train.batch_size=128"]


def launch(*args, timeout=240):
    import sys
    return run_cli(sys.executable, *ACCEL, *args, module=False, timeout=timeout)


def test_guard_unit():
    check_world_size(2, 2, env={"WORLD_SIZE": "2"})
    check_world_size(1, 0, env={})
    with pytest.raises(GentrainError, match="WORLD_SIZE=2 but accelerate runs 1"):
        check_world_size(1, 0, env={"WORLD_SIZE": "2"})
    with pytest.raises(GentrainError, match="expects 2 process"):
        check_world_size(1, 2, env={})
    # a --num_machines 2 DeepSpeed launch through DeepSpeed's own launcher (accelerate's pdsh default): 1 world per node
    with pytest.raises(GentrainError, match="expects 2 process.* started 1 .DeepSpeed's launcher started a 1-machine "
                                            "world.*deepspeed_multinode_launcher: standard"):
        check_world_size(1, 2, env={"WORLD_SIZE": "1", "CROSS_SIZE": "1", "CROSS_RANK": "0"})
    with pytest.raises(GentrainError, match=r"expects 8 process.* started 4 \(2 machine\(s\) x 2 process"):
        check_world_size(4, 8, env={"WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})


def test_cpu_flag_with_two_processes_is_caught(tmp_path):
    # `accelerate launch --cpu --num_processes 2` silently starts ONE process with WORLD_SIZE unset
    r = launch("--cpu", "--num_processes", "2", "-m", "gentrain", "train", "flow_toy2d", "train.num_processes=2",
               "train.max_steps=3", *SMALL, f"run.output_dir={tmp_path}", "run.name=g")
    assert r.returncode != 0
    assert "'train.num_processes' expects 2 process(es) but the launch started 1" in r.stderr
    assert "--multi_gpu" in r.stderr  # and says what to do instead
    assert not (tmp_path / "g" / "checkpoints").exists()


def test_two_process_run_trains_checkpoints_and_resumes(tmp_path):
    """With DDP's all-reduce options on (gradients as bucket views, all-reduced in fp16: the
    default path is every other DDP test's)."""
    common = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "gentrain",
              "train", "flow_toy2d", "train.num_processes=2", "train.max_steps=8", "train.log_every=2",
              "train.checkpoint_every=4", "train.ddp_bucket_view=true", "train.ddp_comm_hook=fp16", *SMALL,
              f"run.output_dir={tmp_path}", "run.name=m"]
    r = launch(*common, "--stop-at", "4")
    ok(r)
    ck = tmp_path / "m" / "checkpoints" / "step_4"
    assert (ck / "data_rank0.json").is_file() and (ck / "data_rank1.json").is_file()
    r = launch(*common[:4], str(free_port()), *common[5:], "--resume", "auto")
    ok(r)
    rows = read_metrics(tmp_path / "m")
    assert [r["step"] for r in rows if "loss/main" in r] == [2, 4, 6, 8]
    assert rows[-2]["kimg"] == pytest.approx(8 * 128 * 2 / 1000)  # images counted across both ranks


@pytest.mark.parametrize("backend", ["ddp", pytest.param("zero2", marks=[pytest.mark.distributed, pytest.mark.deepspeed])])
def test_frozen_peer_ends_the_run_with_a_clear_error(tmp_path, backend):
    """Rank 1 stops (SIGSTOP) mid-run: rank 0 gives up after train.process_group_timeout_s with one
    line, under DDP and under DeepSpeed ZeRO-2 (whose CPU collectives are DeepSpeed's own)."""
    import subprocess
    import sys

    if backend == "ddp":
        launcher = [sys.executable, *ACCEL, "--multi_gpu"]
    else:
        from gentrain.launch import accelerate_config_path

        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(accelerate_config_path(backend))]
    cmd = [*launcher, "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "gentrain", "train", "flow_toy2d", "train.num_processes=2", "train.max_steps=100000",
           "train.log_every=1", "train.checkpoint_every=0", "train.sample_every=0", "train.process_group_timeout_s=10",
           *SMALL, f"run.output_dir={tmp_path}", "run.name=f"]
    errfile = tmp_path / "stderr.txt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(errfile, "w"), text=True,
                            env=cli_env(DS_ACCELERATOR="cpu"), cwd=REPO)
    try:
        metrics = tmp_path / "f" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.5)
        assert metrics.exists(), "training never started"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "gentrain" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGSTOP)  # rank 1 freezes
        t0 = time.time()
        while time.time() - t0 < 120 and "gentrain: error:" not in errfile.read_text():
            time.sleep(0.5)
        err = errfile.read_text()
        assert "rank 0: a peer process stopped answering" in err, err[-3000:]
        assert "process_group_timeout_s=10" in err
        workers[0].kill()  # the launcher would SIGTERM it and wait 30 s for a stopped process
        proc.wait(timeout=60)
        assert proc.returncode != 0
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
