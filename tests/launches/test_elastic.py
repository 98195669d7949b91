"""Elastic resume through the real launcher: a DDP checkpoint written by 2 processes resumes on 1
and one written by 1 resumes on 2, at the same global batch; the data position is remapped so the
rest of the epoch is read exactly once (the exact coverage itself: tests/data_pipeline/test_data_elastic.py).
Here: the run finishes, the epoch ends at the step an uninterrupted run's does, the samples
consumed add up, and a changed global batch or a ZeRO checkpoint on another count is refused."""
import sys

import pytest

from conftest import ok, read_metrics, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

GLOBAL = 16
COMMON = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.kl_warmup_steps=0",
          "train.warmup_steps=0", "train.lr_schedule=constant", "train.ema_decay=0.9", "train.log_every=1",
          "train.sample_every=0", "train.checkpoint_every=100", "train.progress_bar=false", "eval.num_samples=16",
          "eval.digits=false", "train.max_steps=24"]
ACCEL = ["-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("digits_test")
    build_source("digits", str(root / "d"), size=16, split="test", max_samples=100)  # 297 images, 3 shards
    return root / "d"


def train(nproc, *args):
    from conftest import free_port

    per = [f"train.batch_size={GLOBAL // nproc}", f"train.num_processes={nproc}"]
    if nproc == 1:
        return run_cli("train", "vae_digits", *COMMON, *per, *args)
    return run_cli(sys.executable, *ACCEL, "--multi_gpu", "--num_processes", str(nproc), "--main_process_port",
                   str(free_port()), "-m", "gentrain", "train", "vae_digits", *COMMON, *per, *args, module=False)


def first_step_of_epoch_1(run_dir):
    return min(r["step"] for r in read_metrics(run_dir) if r.get("data/epoch", 0) >= 1)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_process_count(digits, tmp_path, before, after):
    data = [f"data.shards={digits}", f"eval.shards={digits}", f"run.output_dir={tmp_path}"]
    r = train(before, *data, "run.name=elastic", "--stop-at", "8")
    ok(r)
    r = train(after, *data, "run.name=elastic", "--resume", "auto")
    ok(r)
    assert "resumed from" in r.stderr and "step_8" in r.stderr
    rows = [m for m in read_metrics(tmp_path / "elastic") if "loss/ae" in m]
    assert [m["step"] for m in rows] == list(range(1, 25))
    assert rows[-1]["kimg"] == pytest.approx(24 * GLOBAL / 1000)
    # 297 samples at 16 a step: the first epoch ends during step 19 (ceil(297 / 16)), as in an
    # uninterrupted run, however the rest was split (sample by sample: test_data_elastic.py)
    assert first_step_of_epoch_1(tmp_path / "elastic") == 19


def test_a_changed_global_batch_is_refused(digits, tmp_path):
    data = [f"data.shards={digits}", f"eval.shards={digits}", f"run.output_dir={tmp_path}", "run.name=g"]
    assert train(1, *data, "--stop-at", "2").returncode == 0
    r = run_cli("train", "vae_digits", *COMMON, "train.batch_size=8", *data, "--resume", "auto")
    assert r.returncode == 2
    assert "trained at a global batch of 16; this run has 8" in r.stderr
