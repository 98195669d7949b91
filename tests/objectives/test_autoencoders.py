"""Autoencoder families end to end: quality against a PCA baseline (and an untrained model failing
it), codebook usage, export round trips through stock diffusers in a fresh process, the
adversarial phases' isolation, presets."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import cli_env, ok, run_cli

FAST = ["model.block_out_channels=[16,32,32]", "model.norm_num_groups=8", "train.max_steps=600", "train.lr=2e-3",
        "train.warmup_steps=20", "train.ema_decay=0.99", "train.sample_every=600", "train.checkpoint_every=600",
        "train.log_every=100", "train.progress_bar=false", "eval.digits=false"]


def load_images(shard_dir):
    import glob
    import io
    import tarfile

    from PIL import Image

    xs = []
    for t in sorted(glob.glob(f"{shard_dir}/*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    xs.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())), dtype=np.float64) / 127.5 - 1)
    return np.stack(xs).reshape(len(xs), -1)


def pca_psnr(root, k):
    """Held-out PSNR of a rank-k PCA fitted on the training split (the linear baseline)."""
    train, test = load_images(root / "train"), load_images(root / "test")
    mu = train.mean(0)
    v = np.linalg.svd(train - mu, full_matrices=False)[2][:k]
    mse = (((test - mu) @ v.T @ v + mu - test) ** 2).mean()
    return 10 * np.log10(4 / mse)


def train_family(preset, root, out, *extra):
    r = run_cli("train", preset, *FAST, f"data.shards={root / 'train'}", f"eval.shards={root / 'test'}",
                f"run.output_dir={out}", "run.name=r", *extra, timeout=900)
    ok(r)
    return out / "r", json.loads(r.stdout)


def untrained_scores(run_dir):
    from gentrain.config import load_config
    from gentrain.eval.metrics import evaluate
    from gentrain.objectives import build_objective

    cfg = load_config(str(run_dir / "config.yaml"))
    torch.manual_seed(0)
    obj = build_objective(cfg)
    for net in obj.nets.values():
        net.eval()
    return evaluate(obj, cfg)


@pytest.fixture(scope="module")
def vae_run(digits16, tmp_path_factory):
    # latent 1 x 4 x 4 = 16 numbers per image (f4), compared with a 16-component PCA
    return train_family("vae_digits", digits16, tmp_path_factory.mktemp("vae"), "model.latent_channels=1",
                        "model.beta=1e-4")


@pytest.fixture(scope="module")
def vq_run(digits16, tmp_path_factory):
    # 4 x 4 = 16 code positions from a 64-code book, compared with a 16-component PCA
    return train_family("vqvae_digits", digits16, tmp_path_factory.mktemp("vq"), "model.num_codes=64")


def test_vae_beats_pca_by_2db_and_untrained_fails(vae_run, digits16):
    run_dir, res = vae_run
    threshold = pca_psnr(digits16, 16) + 2.0
    assert res["eval/psnr"] >= threshold, (res, threshold)
    assert res["eval/images"] == 297 and res["eval/kl_per_image"] > 0
    assert untrained_scores(run_dir)["eval/psnr"] < threshold


def test_vqvae_beats_pca_by_2db_uses_half_the_codebook_and_untrained_fails(vq_run, digits16):
    run_dir, res = vq_run
    threshold = pca_psnr(digits16, 16) + 2.0
    assert res["eval/psnr"] >= threshold, (res, threshold)
    assert res["eval/codebook_usage"] >= 0.5 and res["eval/perplexity"] > 16
    untrained = untrained_scores(run_dir)
    assert untrained["eval/psnr"] < threshold


STOCK_CHECK = """
import sys, json, torch
assert "gentrain" not in sys.modules
from diffusers import {cls}
from safetensors.torch import load_file
m = {cls}.from_pretrained(sys.argv[1]).eval()
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    {body}
ref = load_file(sys.argv[2])["recon"]
print(json.dumps({{"max_diff": float((rec - ref).abs().max()), "scaling_factor": m.config.scaling_factor,
                  "gentrain_imported": "gentrain" in sys.modules}}))
"""
BODIES = {"AutoencoderKL": "rec = m.decode(m.encode(x).latent_dist.mean).sample",
          "VQModel": "rec = m.decode(m.encode(x).latents).sample"}


@pytest.mark.parametrize("which", ["vae", "vq"])
def test_export_round_trip_through_stock_diffusers(which, vae_run, vq_run, digits16, tmp_path):
    from gentrain.train.runs import load_trained

    run_dir, _ = vae_run if which == "vae" else vq_run
    out = tmp_path / "export"
    r = run_cli("export", str(run_dir), "--out", str(out), timeout=300)
    ok(r)
    meta = json.loads((out / "gentrain_export.json").read_text())
    cls = meta["diffusers_class"]
    assert cls == ("AutoencoderKL" if which == "vae" else "VQModel")
    _, objective, _ = load_trained(run_dir)
    x = torch.tensor(load_images(digits16 / "test")[:16], dtype=torch.float32).reshape(16, 1, 16, 16)
    with torch.no_grad():
        recon = objective.reconstruct(x)
    save_file({"x": x, "recon": recon.contiguous()}, str(tmp_path / "io.safetensors"))
    code = STOCK_CHECK.format(cls=cls, body=BODIES[cls])
    p = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "io.safetensors")],
                       capture_output=True, text=True, timeout=300, env=cli_env(), cwd=tmp_path)
    ok(p)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert not got["gentrain_imported"]
    assert got["max_diff"] < 1e-5
    assert got["scaling_factor"] == pytest.approx(meta["scaling_factor"]) and got["scaling_factor"] != 0.18215


def test_adversarial_phases_update_only_their_own_nets(digits16, tmp_path, fresh_accelerate_state):
    from gentrain.config import load_config
    from gentrain.train.loop import Trainer

    cfg = load_config("vae_digits", [*FAST, "model.adversarial.enabled=true", "model.adversarial.start_step=0",
                                     "model.adversarial.layers=1", "model.adversarial.base_channels=8",
                                     "train.batch_size=8", "train.warmup_steps=0", "train.lr_schedule=constant",
                                     f"data.shards={digits16 / 'train'}", f"eval.shards={digits16 / 'test'}",
                                     f"run.output_dir={tmp_path}", "run.trackers=[]"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert [p.name for p in trainer.phases] == ["ae", "disc"]
    nets = trainer.objective.nets
    snap = lambda n: {k: v.clone() for k, v in nets[n].state_dict().items()}
    same = lambda a, n: all(torch.equal(a[k], v) for k, v in nets[n].state_dict().items())
    it = iter(trainer.stream)
    ae0, d0 = snap("ae"), snap("disc")
    _, _, logs = trainer._run_phase(0, it)               # autoencoder (with the GAN term) step
    assert "gan/g_loss" in logs and same(d0, "disc") and not same(ae0, "ae")
    ae1, d1 = snap("ae"), snap("disc")
    trainer._run_phase(1, it)                            # discriminator step
    assert same(ae1, "ae") and not same(d1, "disc")


def test_vae_toy2d_trains_and_samples_the_prior(tmp_path):
    r = run_cli("train", "vae_toy2d", "train.max_steps=300", "train.progress_bar=false", "train.sample_every=0",
                "train.checkpoint_every=0", "eval.num_samples=1000", f"run.output_dir={tmp_path}", timeout=600)
    ok(r)
    res = json.loads(r.stdout)
    assert res["eval/recon_mse"] < 0.5 and np.isfinite(res["eval/energy_distance"])


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("shapes16")
    build_source("shapes", str(root), size=16, count=64, max_samples=20)
    return root


@pytest.mark.parametrize("preset", ["autoencoder_kl_f4", "vqgan_f4"])
def test_gpu_sized_presets_run_two_steps_at_small_width(preset, shapes16, tmp_path):
    """Same structure (3 levels, 2 layers per block, attention, adversarial phase, bf16), small width
    (and a 2-layer PatchGAN: 3 layers need >= 24-px images)."""
    r = run_cli("train", preset, "model.block_out_channels=[8,16,16]", "model.norm_num_groups=8",
                "model.adversarial.start_step=0", "model.adversarial.base_channels=8", "model.num_codes=64",
                "model.adversarial.layers=2",
                "data.image_size=16", "data.num_workers=0", f"data.shards={shapes16}", "train.batch_size=2",
                "train.max_steps=2", "train.log_every=1", "train.progress_bar=false", "eval.num_samples=4",
                f"run.output_dir={tmp_path}", "run.name=s", timeout=600)
    ok(r)
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/ae", "loss/disc", "gan/g_loss"} <= set(rows[0])
    assert (tmp_path / "s" / "checkpoints" / "step_2" / "manifest.json").is_file()


def test_vqvae_on_shards_resumes_bitwise_with_two_workers(digits16, tmp_path):
    args = ["train", "vqvae_digits", "model.block_out_channels=[8,16,16]", "model.norm_num_groups=8",
            f"data.shards={digits16 / 'train'}", f"eval.shards={digits16 / 'test'}", "data.num_workers=2",
            "train.batch_size=16", "train.max_steps=6", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=100", "train.progress_bar=false", "eval.num_samples=16", "eval.digits=false",
            f"run.output_dir={tmp_path}"]
    assert run_cli(*args, "run.name=a").returncode == 0
    assert run_cli(*args, "run.name=b", "--stop-at", "3").returncode == 0
    r = run_cli(*args, "run.name=b", "--resume", "auto")
    ok(r)
    loss = lambda d: {x["step"]: (x["loss/ae"], x["vq/usage"]) for x in map(json.loads, (tmp_path / d / "metrics.jsonl")
                      .read_text().splitlines()) if "loss/ae" in x}
    a, b = loss("a"), loss("b")
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
