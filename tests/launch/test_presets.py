"""Every shipped preset trains for real in CI: a 2-step smoke here, or in the family's own tests.
GPU-sized presets keep their structure (levels, layers, attention, f8 latents, 77-token CLIP text,
256 px) at small widths, with a tiny local autoencoder and CLIP text encoder instead of hub ids."""
import json

import pytest

from conftest import make_tiny_clip, make_tiny_vae, ok, run_cli

# presets that other test files train (a smoke here would repeat them)
TRAINED_ELSEWHERE = {
    "flow_toy2d": "test_flow_toy2d", "ddpm_toy2d": "test_diffusion_toy2d", "vae_toy2d": "test_autoencoders",
    "vae_digits": "test_autoencoders", "vqvae_digits": "test_autoencoders", "autoencoder_kl_f4": "test_autoencoders",
    "vqgan_f4": "test_autoencoders", "vae_shapes": "test_shapes_t2i", "t2i_flow_digits": "test_t2i_flow", "t2i_ddpm_digits": "test_denoising_exports",
    "dit_class_digits": "test_denoising_exports", "ddpm_digits": "test_denoising_exports",
    "t2i_flow_shapes": "test_shapes_t2i",
    "t2i_pixart_shapes": "test_text_transformers", "t2i_mmdit_shapes": "test_text_transformers",
    "gan_toy2d": "test_gan", "wgan_toy2d": "test_gan", "wgan_gp_toy2d": "test_gan", "lsgan_toy2d": "test_gan",
    "hinge_toy2d": "test_gan_runs", "dcgan_digits": "test_gan", "stylegan_digits": "test_gan",
    "cgan_text_digits": "test_gan", "cgan_digits": "test_gan_runs", "pix2pix_edges2digits": "test_gan_runs",
    "cyclegan_digits_inverted": "test_gan_runs",
    "finetune_t2i": "test_finetune", "finetune_t2i_lora": "test_finetune",
    # hub-sized SDXL / SD3.5 presets: 2 steps each on a tiny pipeline of their class (validated and planned
    # offline with the real hub ids in test_plan_pipelines)
    "finetune_sdxl_lora": "test_finetune_presets_smoke", "finetune_sdxl_full": "test_finetune_presets_smoke",
    "finetune_sd3_lora": "test_finetune_presets_smoke",
}
SMALL_256 = ["model.block_out_channels=[32,32,32,32]", "model.attention_head_dim=4", "data.num_workers=0",
             "train.batch_size=2", "train.mixed_precision=bf16"]
SMOKE = {
    "sde_toy2d": ["train.batch_size=64", "eval.num_samples=64"],
    "ldm_t2i_256": SMALL_256,
    "flow_t2i_256": SMALL_256,
}


def test_every_preset_is_trained_by_some_test():
    from gentrain.config import list_presets

    assert set(list_presets()) == set(TRAINED_ELSEWHERE) | set(SMOKE)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("presets")
    build_source("shapes", str(root / "shapes256"), size=256, count=8, max_samples=8)
    make_tiny_vae(root / "vae_f8", 3, (8, 8, 8, 8), 256, 0.18215)
    make_tiny_clip(root / "clip")
    return root


@pytest.mark.parametrize("preset", sorted(SMOKE))
def test_preset_two_steps(preset, assets, tmp_path):
    from gentrain.config import load_config

    extra = []
    if preset.endswith("_256"):
        extra = [f"data.shards={assets / 'shapes256'}", f"model.latent.autoencoder={assets / 'vae_f8'}",
                 f"model.latent.text_encoder={assets / 'clip'}"]
        full = load_config(preset)
        assert full.model.latent.max_length == 77 and full.data.image_size == 256
        assert len(full.model.block_out_channels) == 4 and full.model.layers_per_block == 2
    r = run_cli("train", preset, *SMOKE[preset], *extra, "train.max_steps=2", "train.log_every=1",
                "train.sample_every=2", "train.checkpoint_every=2", "train.progress_bar=false",
                f"run.output_dir={tmp_path}", "run.name=s", timeout=600)
    ok(r)
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss/main" in row] == [1, 2]
    assert all(row["loss/main"] == row["loss/main"] for row in rows if "loss/main" in row)   # finite, not NaN
    assert (tmp_path / "s" / "checkpoints" / "step_2" / "manifest.json").is_file()
    assert (tmp_path / "s" / "samples" / "step_2.png").is_file()
