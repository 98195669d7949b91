"""Scaled-down quality, one short run per conditional objective on 16-px digits: a 400-step
autoencoder, then 400 steps of latent flow (text), latent diffusion (text) and DiT diffusion
(class labels). The digits classifier must read the asked-for digit in most samples; the same
networks untrained read ~10%."""
import json

import pytest
import torch

from conftest import run_cli

STEPS = ["train.max_steps=400", "train.sample_every=0", "train.checkpoint_every=400", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def latent_digits(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("t2i_quality")
    build_source("digits", str(root / "train"), size=16, split="train")
    r = run_cli("train", "vae_digits", f"data.shards={root / 'train'}", *STEPS, "eval.digits=false",
                "eval.num_samples=64", "eval.shards=null", f"run.output_dir={root}", "run.name=ae", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert run_cli("export", str(root / "ae"), "--out", str(root / "vae"), timeout=300).returncode == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["t2i_flow_digits", "t2i_ddpm_digits", "dit_class_digits"])
def test_short_run_follows_its_conditioning_and_untrained_fails(preset, latent_digits):
    from gentrain.launch.config import load_config
    from gentrain.train.metrics import evaluate
    from gentrain.train.objectives import build_objective

    root = latent_digits
    small = [] if preset.startswith("dit") else ["model.block_out_channels=[32,64]"]   # scaled down: 4x cheaper
    r = run_cli("train", preset, f"data.shards={root / 'train'}", f"model.latent.autoencoder={root / 'vae'}", *STEPS, *small,
                "eval.digits=true", "eval.num_samples=200", "eval.fd_seeds=1", f"run.output_dir={root}",
                f"run.name={preset}", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    keys = ["eval/accuracy"] if preset.startswith("dit") else ["eval/accuracy_numeral", "eval/accuracy_word"]
    assert all(res[k] >= 0.8 for k in keys), res
    cfg = load_config(str(root / preset / "config.yaml"))
    torch.manual_seed(0)
    untrained = build_objective(cfg)
    next(iter(untrained.nets.values())).eval()
    bad = evaluate(untrained, cfg)
    assert all(bad[k] < 0.5 for k in keys), bad
