"""GAN runs end to end: quality bars on short runs (each beside an untrained generator failing the
same bar: the hinge ring, Pix2Pix, CycleGAN), a 2-process DDP run with BatchNorm in both nets,
CycleGAN's pool through a resume."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import digit_splits, free_port, ok, read_metrics, run_cli

pytestmark = pytest.mark.slow
QUIET = ["train.progress_bar=false", "run.trackers=[]", "train.sample_every=0"]


def untrained(run_dir):
    """The same run's eval with the generator's initial weights (same seed, no steps)."""
    from gentrain.eval.metrics import evaluate
    from gentrain.objectives import build_objective
    from gentrain.train.runs import load_run_config

    cfg = load_run_config(run_dir)
    torch.manual_seed(cfg.train.seed)
    obj = build_objective(cfg)
    for net in obj.nets.values():
        net.eval()
    return evaluate(obj, cfg)


def eval_json(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def short_run(preset, splits, tmp_path, name, steps):
    """`gentrain train PRESET` for `steps` steps on the built splits: its eval and the untrained generator's."""
    r = run_cli("train", preset, *QUIET, f"train.max_steps={steps}", "train.checkpoint_every=0",
                f"data.shards={splits / 'train'}", f"eval.shards={splits / 'test'}",
                f"run.output_dir={tmp_path}", f"run.name={name}", timeout=600)
    ok(r)
    res, base = eval_json(tmp_path / name), untrained(tmp_path / name)
    print({k: v for k, v in res.items() if k.startswith("eval/")}, base)
    return res, base


def test_hinge_gan_covers_the_ring_and_untrained_does_not(tmp_path):
    r = run_cli("train", "hinge_toy2d", *QUIET, "train.max_steps=1500", "train.checkpoint_every=0",
                f"run.output_dir={tmp_path}", "run.name=ring", timeout=600)
    ok(r)
    res, base = eval_json(tmp_path / "ring"), untrained(tmp_path / "ring")
    print({k: res[k] for k in ("eval/modes", "eval/hq_fraction", "eval/energy_distance")}, base)
    # a short run: every mode found, points gathering on them (the >= 90% HQ target is bench/gan_quality.py's)
    assert res["eval/modes"] >= 7 and res["eval/hq_fraction"] >= 0.1
    assert base["eval/modes"] < 7 and base["eval/hq_fraction"] < 0.1
    assert res["eval/energy_distance"] < base["eval/energy_distance"] / 5


@pytest.fixture(scope="module")
def edges16(tmp_path_factory):
    return digit_splits(tmp_path_factory, "edges2digits")


def test_pix2pix_outputs_read_as_the_digit_and_export_loads_fresh(edges16, tmp_path):
    res, base = short_run("pix2pix_edges2digits", edges16, tmp_path, "p2p", 300)
    assert res["eval/accuracy"] >= 0.8 and res["eval/psnr"] >= 14     # held-out, 297 images
    assert base["eval/accuracy"] < 0.8 and base["eval/psnr"] < 14
    out = tmp_path / "export"
    assert run_cli("export", str(tmp_path / "p2p"), "--out", str(out)).returncode == 0
    x = torch.linspace(-1, 1, 2 * 16 * 16).view(2, 1, 16, 16)
    code = ("import sys, json, torch; from gentrain.modeling.gan.image2image import UNetGenerator; "
            "g = UNetGenerator.from_pretrained(sys.argv[1]).eval(); "
            "print(json.dumps(g(torch.linspace(-1, 1, 512).view(2, 1, 16, 16)).flatten().tolist()))")
    fresh = subprocess.run([sys.executable, "-c", code, str(out / "generator")], capture_output=True, text=True,
                           timeout=120)
    ok(fresh)
    from gentrain.train.runs import load_trained

    _, obj, _ = load_trained(tmp_path / "p2p")
    assert torch.allclose(torch.tensor(json.loads(fresh.stdout)), obj.sample(2, {"input": x}).flatten(), atol=1e-6)
    # and the CLI translates an input image file
    from PIL import Image

    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy(), mode="L").save(tmp_path / "edge.png")
    r = run_cli("sample", str(tmp_path / "p2p"), "--input", str(tmp_path / "edge.png"), "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0 and json.loads(r.stdout)["shape"] == [1, 1, 16, 16], r.stderr[-2000:]


@pytest.mark.distributed
def test_conditional_dcgan_trains_on_two_processes_with_batchnorm_and_resumes(digits16, tmp_path):
    common = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "gentrain",
              "train", "cgan_digits", "train.num_processes=2", "train.max_steps=4", "train.log_every=1",
              "train.checkpoint_every=2", "train.batch_size=16", "model.base_channels=8", "model.d_base_channels=8",
              "eval.num_samples=100", "eval.fd_seeds=1", *QUIET, f"data.shards={digits16 / 'train'}",
              f"eval.shards={digits16 / 'test'}", f"run.output_dir={tmp_path}", "run.name=ddp"]
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"]
    r = run_cli(*accel, *common, "--stop-at", "2", module=False, timeout=300)
    ok(r)
    common[4] = str(free_port())
    r = run_cli(*accel, *common, "--resume", "auto", module=False, timeout=300)
    ok(r)
    rows = [row for row in read_metrics(tmp_path / "ddp") if "loss/disc" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([row["loss/disc"], row["loss/gen"]])).all() for row in rows)
    assert "eval/accuracy" in eval_json(tmp_path / "ddp")


@pytest.fixture(scope="module")
def inverted16(tmp_path_factory):
    return digit_splits(tmp_path_factory, "digits_inverted")


def test_cyclegan_translations_keep_the_digit_and_untrained_do_not(inverted16, tmp_path):
    """Held-out B (thick, inverted) -> A read as B's digit by the classifier trained on plain digits;
    the raw B images read ~0.14, an untrained G_ba ~0.1. Measured: 0.983 after these 400 steps
    (0.99-1.0 after the preset's 1,000)."""
    res, base = short_run("cyclegan_digits_inverted", inverted16, tmp_path, "cyc", 400)
    assert res["eval/label_preservation_ba"] >= 0.9 and res["eval/label_preservation_aba"] >= 0.9
    assert base["eval/label_preservation_ba"] < 0.5 and base["eval/accuracy_raw_b"] < 0.5


def test_cyclegan_resumes_bitwise_with_its_image_pool(tmp_path):
    from gentrain.data_pipeline.sources import build_source

    build_source("digits_inverted", str(tmp_path / "data"), size=16, split="test")
    args = ["train", "cyclegan_digits_inverted", *QUIET, "train.max_steps=6", "train.batch_size=4",
            "train.checkpoint_every=100", "model.base_channels=4", "model.n_blocks=1", "model.d_base_channels=4",
            "model.pool_size=6", "eval.num_samples=8", "eval.digits=false", f"data.shards={tmp_path / 'data'}",
            f"eval.shards={tmp_path / 'data'}", f"run.output_dir={tmp_path}"]
    assert run_cli(*args, "run.name=straight").returncode == 0
    r = run_cli(*args, "run.name=split", "--stop-at", "3")
    ok(r)
    from safetensors.torch import load_file

    pool = load_file(str(tmp_path / "split" / "checkpoints" / "step_3" / "objective_rank0.safetensors"))
    assert pool["pool_a.images"].shape == (6, 1, 16, 16)  # 3 steps x 4 fakes, capped at 6
    r = run_cli(*args, "run.name=split", "--resume", "auto")
    ok(r)
    a, b = (tmp_path / n / "checkpoints" / "step_6" for n in ("straight", "split"))
    for f in ("model.safetensors", "model_3.safetensors", "objective_rank0.safetensors", "optimizer_1.bin"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
