"""A new user's first hour (issue 27, defects 1-7 and 10): bad inputs get one line and exit 2 before
anything is created, keys that would do nothing are refused, and a dry run checks what a real start
checks."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import make_tiny_sd_pipeline, make_tiny_vae, ok, run_cli

QUIET = ["train.progress_bar=false", "train.sample_every=0", "run.trackers=[]"]


def one_line_error(r, needle: str) -> str:
    """`r` exited 2 with exactly one `gentrain: error:` line holding `needle`, and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("gentrain: error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr[-3000:]
    return lines[0]


# where nothing needs loading a refusal takes under 5 s (a forked CLI; a fresh interpreter adds its imports)
LIMIT_S = 60 if os.environ.get("GENTRAIN_TEST_FRESH") == "1" else 5


@pytest.fixture(scope="module", autouse=True)
def warm_cli():
    """Start the CLI fork server (its one-time imports) before anything is timed."""
    run_cli("--help", timeout=120)


def timed(*args, **kw):
    t0 = time.time()
    r = run_cli(*args, timeout=120, **kw)
    return r, time.time() - t0


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("shapes32")
    build_source("shapes", str(root), size=32, count=16)
    return root


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A two-step flow_toy2d run (model.hidden 256) with its step-2 checkpoint, for resume and export
    (--stop-at: no final eval, ~7 s)."""
    root = tmp_path_factory.mktemp("runs")
    ok(run_cli("train", "flow_toy2d", *QUIET, "train.max_steps=2", "train.batch_size=64", "eval.num_samples=50",
               f"run.output_dir={root}", "run.name=toy", "--stop-at", "2", timeout=300))
    return root / "toy"


# 1 ------------------------------------------------------------------------------------------------
def test_wrong_channel_autoencoder_is_refused_before_the_run_starts(shapes32, tmp_path):
    vae1 = make_tiny_vae(tmp_path / "vae1", 1, (8, 16), 32, 1.0)
    runs = tmp_path / "runs"
    r, seconds = timed("train", "t2i_flow_shapes", *QUIET, f"model.latent.autoencoder={vae1}",
                       f"data.shards={shapes32}", "train.max_steps=2", "train.batch_size=8",
                       f"run.output_dir={runs}")
    one_line_error(r, "config key 'data.channels': 3, but the autoencoder (model.latent.autoencoder) takes 1-channel")
    assert not runs.exists() and seconds < LIMIT_S
    # a fine-tune's pipeline folder (1-channel VAE) gets the same check from its vae/ and unet/ configs
    pipe = make_tiny_sd_pipeline(tmp_path / "sd")
    r, seconds = timed("train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={shapes32}",
                       "data.image_size=32", f"run.output_dir={runs}")
    one_line_error(r, "config key 'data.channels': 3, but the autoencoder (model.pretrained) takes 1-channel")
    assert not runs.exists() and seconds < LIMIT_S


def test_autoencoder_fit_is_checked_where_it_loads(tmp_path):
    """The same check on the loaded model (hub ids, `gentrain sample`): channels and downsampling."""
    from gentrain.errors import GentrainError
    from gentrain.objectives.latent import LatentSpace, check_autoencoder_fit

    vae3 = make_tiny_vae(tmp_path / "vae3", 3, (8, 16), 32, 1.0)   # f = 2
    assert LatentSpace(str(vae3), 32, 3).factor == 2
    with pytest.raises(GentrainError, match="1-channel autoencoder"):
        LatentSpace(str(vae3), 32, 1)
    with pytest.raises(GentrainError, match="'data.image_size': 33 is not a multiple of the autoencoder's "
                                            "downsampling factor 2"):
        LatentSpace(str(vae3), 33, 3)
    with pytest.raises(GentrainError, match="latents have 4 channels, but the denoiser takes 8"):
        check_autoencoder_fit({"in_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16]},
                              channels=3, image_size=32, net_in_channels=8)


# 2 ------------------------------------------------------------------------------------------------
def test_a_train_key_that_would_do_nothing_is_refused():
    r = run_cli("train", "dcgan_digits", "train.lr=5e-4", "--dry-run", timeout=120)
    one_line_error(r, "config key 'train.lr': 0.0005 does nothing in the gan family")
    assert "model.g_optimizer.lr and model.d_optimizer.lr" in r.stderr
    r = run_cli("train", "pix2pix_edges2digits", "train.lr_schedule=cosine", "--dry-run", timeout=120)
    one_line_error(r, "config key 'train.lr_schedule': 'cosine' does nothing in the pix2pix family")
    r = run_cli("train", "flow_toy2d", "train.ema_warmup=false", "train.ema_decay=0", "--dry-run", timeout=120)
    one_line_error(r, "config key 'train.ema_warmup' does nothing without an EMA")
    ok(run_cli("train", "dcgan_digits", "model.g_optimizer.lr=5e-4", "--dry-run", timeout=120))


def test_warmup_applies_to_a_constant_schedule():
    """diffusers' "constant" ignores num_warmup_steps; train.warmup_steps=4 with it warms up."""
    import torch

    from gentrain.config import TrainConfig
    from gentrain.objectives import Phase
    from gentrain.train.optim import build_optimizer, build_schedule

    t = TrainConfig(lr=1.0, lr_schedule="constant", warmup_steps=4, max_steps=10)
    phase = Phase("main", ("net",))
    opt = build_optimizer(phase, [torch.nn.Parameter(torch.zeros(1))], t)
    sched = build_schedule(phase, opt, t)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


# 3 ------------------------------------------------------------------------------------------------
def test_dry_run_resume_runs_the_compatibility_check(toy_run):
    before = {p: p.stat().st_mtime_ns for p in toy_run.rglob("*")}
    args = ["train", "flow_toy2d", *QUIET, "train.max_steps=2", "train.batch_size=64", "eval.num_samples=50",
            f"run.output_dir={toy_run.parent}", "run.name=toy"]
    one_line_error(run_cli(*args, "model.hidden=64", "--resume", "auto", "--dry-run", timeout=120),
                   "config key 'model.hidden' differs from the run being resumed (256 -> 64)")
    r = run_cli(*args, "train.max_steps=4", "--resume", "auto", "--dry-run", timeout=120)
    assert r.returncode == 0 and "would resume from" in r.stderr and "step_2" in r.stderr, r.stderr
    assert {p: p.stat().st_mtime_ns for p in toy_run.rglob("*")} == before   # the dry runs wrote nothing


# 4 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["exports/nope", "./nope", "parts/deeper/nope"])
def test_a_pretrained_path_that_does_not_exist_is_refused_at_once(value, shapes32, tmp_path):
    (tmp_path / "exports").mkdir()
    r, seconds = timed("train", "finetune_t2i_lora", f"model.pretrained={value}", f"data.shards={shapes32}",
                       "run.output_dir=runs", cwd=tmp_path)
    one_line_error(r, f"config key 'model.pretrained': '{value}' does not exist")
    assert seconds < LIMIT_S and sorted(p.name for p in tmp_path.iterdir()) == ["exports"]
    r = run_cli("train", "t2i_flow_shapes", f"model.latent.autoencoder={value}", f"data.shards={shapes32}",
                "run.output_dir=runs", cwd=tmp_path, timeout=120)
    one_line_error(r, f"config key 'model.latent.autoencoder': '{value}' does not exist")


def test_a_failed_hub_lookup_says_how_to_go_offline(monkeypatch):
    from gentrain.modeling.pretrained import load_failure, looks_like_path

    assert not looks_like_path("org/model") and not looks_like_path("model")
    assert looks_like_path("~/m") and looks_like_path("a/b/c") and looks_like_path("../m")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    msg = str(load_failure("model.pretrained", "org/model", OSError("cannot reach the hub\nmore"), "a pipeline"))
    assert "export HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = str(load_failure("model.pretrained", "org/model", OSError("not in the cache"), "a pipeline"))
    assert "HF_HUB_OFFLINE is set" in msg


# 5 ------------------------------------------------------------------------------------------------
def test_out_naming_an_existing_file_is_one_line(toy_run, shapes32, tmp_path):
    some_file = tmp_path / "some_file.py"
    some_file.write_text("print('mine')\n")
    not_a_folder = f"--out {some_file}: is an existing file, not a folder"
    cases = [
        (["export", str(toy_run), "--out", str(some_file)], not_a_folder),
        (["data", "build", "--source", "shapes", "--count", "4", "--out", str(some_file)], not_a_folder),
        (["data", "cache", "--shards", str(shapes32), "--out", str(some_file), "--autoencoder", str(tmp_path),
          "--image-size", "32"], not_a_folder),
        (["demo", "--out", str(some_file)], not_a_folder),
        (["sample", str(toy_run), "--out", str(tmp_path)], f"--out {tmp_path}: is a folder; name a file"),
        (["sample", str(toy_run), "--out", str(some_file / "x.png")], f"{some_file} is a file, not a folder"),
    ]
    for args, needle in cases:
        r, seconds = timed(*args)
        one_line_error(r, needle)
        assert seconds < LIMIT_S, (args, seconds)
    assert some_file.read_text() == "print('mine')\n" and sorted(p.name for p in tmp_path.iterdir()) == ["some_file.py"]


# 6 ------------------------------------------------------------------------------------------------
@pytest.fixture
def images_with_a_corrupt_one(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(folder / f"img_{i:04d}.jpg")
        (folder / f"img_{i:04d}.txt").write_text(f"a red square {i}")
    (folder / "img_0010.jpg").write_bytes(b"not a jpeg at all")
    return folder


def test_a_corrupt_image_names_the_file_and_can_be_skipped(images_with_a_corrupt_one, tmp_path):
    folder, out = images_with_a_corrupt_one, tmp_path / "data" / "built"
    r = run_cli("data", "build", "--source", f"folder:{folder}", "--out", str(out), "--shard-samples", "4", timeout=120)
    line = one_line_error(r, f"image file {folder / 'img_0010.jpg'} is not a readable image")
    assert "img_0000010" not in line and "--bad-image skip" in line
    assert not (tmp_path / "data").exists()   # nothing of the failed build is left (defect 10 too)
    r = run_cli("data", "build", "--source", f"folder:{folder}", "--out", str(out), "--shard-samples", "4",
                "--bad-image", "skip", timeout=120)
    ok(r)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 11 and summary["bad_images_skipped"] == 1
    assert f"bad image left out: image file {folder / 'img_0010.jpg'}" in r.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 11 and len(index["skipped"]) == 1


# 7 ------------------------------------------------------------------------------------------------
def test_missing_shard_folder_names_the_key_at_once(tmp_path):
    runs = tmp_path / "runs"
    r, seconds = timed("train", "dcgan_digits", f"data.shards={tmp_path / 'no_such_shards'}",
                       f"run.output_dir={runs}")
    one_line_error(r, f"config key 'data.shards': the folder {tmp_path / 'no_such_shards'} does not exist")
    assert seconds < LIMIT_S and not runs.exists()
    (tmp_path / "shards").mkdir()
    r = run_cli("train", "dcgan_digits", f"data.shards={tmp_path / 'shards'}/{{000000..000001}}.tar",
                f"run.output_dir={runs}", timeout=120)
    one_line_error(r, f"config key 'data.shards': shard {tmp_path / 'shards' / '000000.tar'} does not exist "
                      "(2 of the 2 shards")


# 10 -----------------------------------------------------------------------------------------------
def test_a_failed_start_leaves_no_directory_it_created(shapes32, tmp_path):
    not_a_pipeline = tmp_path / "not_a_pipeline"
    not_a_pipeline.mkdir()                      # exists, so it passes the path check; fails when loaded
    runs = tmp_path / "runs"
    args = ["train", "finetune_t2i_lora", f"model.pretrained={not_a_pipeline}", f"data.shards={shapes32}",
            f"run.output_dir={runs}", "run.name=bad_lora1"]
    one_line_error(run_cli(*args, timeout=120), "config key 'model.pretrained'")
    assert not runs.exists()
    # a run directory that was there before is left as it was
    (runs / "bad_lora1").mkdir(parents=True)
    (runs / "bad_lora1" / "notes.txt").write_text("mine")
    one_line_error(run_cli(*args, "--resume", "auto", timeout=120), "config key 'model.pretrained'")
    assert [p.name for p in (runs / "bad_lora1").iterdir()] == ["notes.txt"]
    # a failed data build whose source folder does not exist creates nothing
    r = run_cli("data", "build", "--source", f"folder:{tmp_path / 'missing'}", "--out", str(tmp_path / "d" / "x"),
                timeout=120)
    one_line_error(r, "is not an existing folder")
    assert not (tmp_path / "d").exists()
