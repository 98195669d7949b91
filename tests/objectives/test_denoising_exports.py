"""Latent diffusion, DiT and pixel-space DDPM through the real CLI: each trains, exports to its stock
diffusers pipeline (StableDiffusionPipeline + DDIM, DiTPipeline, DDPMPipeline), and the export,
reloaded in a fresh process that never imports gentrain, samples what gentrain's own sampler
samples on the scheduler's timesteps (same seed and steps)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, make_tiny_clip, make_tiny_vae, ok, run_cli

STOCK = """
import sys, json, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert "gentrain" not in sys.modules
kw = json.loads(sys.argv[2])
if "labels" in kw:
    kw["class_labels"] = pipe.get_label_ids(kw.pop("labels"))
out = pipe(generator=torch.Generator().manual_seed(0), **kw)
images = out.images
images = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
pipe.scheduler.set_timesteps(kw["num_inference_steps"])
save_file({"images": images.contiguous(), "timesteps": pipe.scheduler.timesteps.contiguous()}, sys.argv[3])
print(type(pipe).__name__, type(pipe.scheduler).__name__, json.dumps(getattr(pipe, "labels", None)))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("denoising")
    build_source("digits", str(root / "digits"), size=16, count=128, max_samples=64)
    make_tiny_vae(root / "vae", 1, (8, 16, 16), 16, 0.7)
    return root


def train_and_export(assets, name, preset, *overrides):
    common = [f"data.shards={assets / 'digits'}", "train.batch_size=8", "train.max_steps=2", "train.log_every=1",
              "train.sample_every=2", "train.checkpoint_every=2", "train.progress_bar=false", "eval.digits=false",
              "eval.num_samples=16", f"run.output_dir={assets}", f"run.name={name}"]   # the end-of-run eval: a smoke
    r = run_cli("train", preset, *common, *overrides, timeout=600)
    ok(r)
    assert (assets / name / "samples" / "step_2.png").is_file()
    r = run_cli("export", str(assets / name), "--out", str(assets / f"{name}_export"), timeout=600)
    ok(r)
    return assets / name, assets / f"{name}_export"


def stock(export, tmp_path, **kw):
    p = subprocess.run([sys.executable, "-c", STOCK, str(export), json.dumps(kw), str(tmp_path / "stock.safetensors")],
                       capture_output=True, text=True, timeout=600, env=cli_env(), cwd=tmp_path)
    ok(p)
    return p.stdout.split(maxsplit=2), load_file(str(tmp_path / "stock.safetensors"))


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SMALL_UNET = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=4"]


def test_latent_diffusion_exports_stable_diffusion_with_ddim(assets, tmp_path):
    from gentrain.train.runs import load_trained

    run, export = train_and_export(assets, "ldm", "t2i_ddpm_digits", *SMALL_UNET,
                                   f"model.latent.autoencoder={assets / 'vae'}")
    prompts = ["a handwritten digit 7", "a handwritten digit seven", ""]
    (name, sched, _), out = stock(export, tmp_path, prompt=prompts, num_inference_steps=8, guidance_scale=3.0,
                                  output_type="latent", height=16, width=16)
    assert (name, sched) == ("StableDiffusionPipeline", "DDIMScheduler")
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert config["clip_sample"] is False and config["steps_offset"] == 1
    assert config["prediction_type"] == "v_prediction"
    _, objective, _ = load_trained(run)
    ours = objective.sample(3, {"prompts": prompts}, generator=torch.Generator().manual_seed(0), guidance_scale=3.0,
                            timesteps=out["timesteps"], decode=False)
    assert out["timesteps"][0] == 999                    # trailing spacing: the first step is pure noise
    assert (ours - out["images"]).abs().max() <= 1e-4
    r = run_cli("sample", str(run), "--prompt", "a handwritten digit 3", "--steps", "4", "--out", str(tmp_path / "s.png"),
                timeout=300)
    ok(r)
    assert json.loads(r.stdout)["shape"] == [1, 1, 16, 16]


@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_class_conditional_dit_exports_dit_pipeline(assets, tmp_path, family):
    from gentrain.train.runs import load_trained

    preset = "dit_class_digits" if family == "diffusion" else str(write_flow_dit(tmp_path))
    run, export = train_and_export(assets, f"dit_{family}", preset, "model.dit_layers=2", "model.dit_heads=2",
                                   "model.dit_head_dim=8", f"model.latent.autoencoder={assets / 'vae'}")
    (name, sched, id2label), out = stock(export, tmp_path, labels=["7", "seven", "0"], num_inference_steps=8,
                                         guidance_scale=3.0, output_type="np")
    assert name == "DiTPipeline"
    assert sched == ("DDIMScheduler" if family == "diffusion" else "DPMSolverMultistepScheduler")
    assert json.loads(id2label) == {**{str(i): i for i in range(10)}, **dict(zip(WORDS, range(10)))}
    _, objective, _ = load_trained(run)
    labels = [7, 7, 0]
    sigmas = {}
    if family == "flow":
        from diffusers import DPMSolverMultistepScheduler

        s = DPMSolverMultistepScheduler.from_pretrained(str(export), subfolder="scheduler")
        s.set_timesteps(8)
        sigmas = {"sigmas": s.sigmas, "timesteps": s.timesteps}
    ours = objective.sample(3, {"labels": labels}, generator=torch.Generator().manual_seed(0), guidance_scale=3.0,
                            **({"timesteps": out["timesteps"]} if family == "diffusion" else sigmas))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (ours - out["images"]).abs().max() <= 1e-4
    if family == "diffusion":  # the CLI samples class models by label, and says so when none is given
        r = run_cli("sample", str(run), "--label", "7", "--label", "1", "-n", "3", "--steps", "4", "--guidance", "2",
                    "--out", str(tmp_path / "s.png"), timeout=300)
        ok(r)
        assert json.loads(r.stdout)["shape"] == [3, 1, 16, 16] and (tmp_path / "s.png").is_file()
        r = run_cli("sample", str(run), "-n", "2", timeout=300)
        assert r.returncode == 2 and "pass --label" in r.stderr


def write_flow_dit(tmp_path):
    """dit_class_digits with the flow family (its diffusion-only keys dropped)."""
    import yaml

    from gentrain.config import PRESET_DIR

    cfg = yaml.safe_load((PRESET_DIR / "dit_class_digits.yaml").read_text())
    for k in ("beta_schedule", "prediction_type", "min_snr_gamma"):
        cfg["model"].pop(k)
    cfg["model"].update(family="flow", sampler="euler", time_sampling="logit_normal")
    path = tmp_path / "flow_dit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pixel_ddpm_exports_ddpm_pipeline(assets, tmp_path):
    from gentrain.train.runs import load_trained

    run, export = train_and_export(assets, "pixel", "ddpm_digits", *SMALL_UNET)
    (name, sched, _), out = stock(export, tmp_path, batch_size=3, num_inference_steps=8, output_type="np")
    assert (name, sched) == ("DDPMPipeline", "DDPMScheduler")
    _, objective, _ = load_trained(run)
    ours = objective.sample(3, generator=torch.Generator().manual_seed(0), timesteps=out["timesteps"])
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (ours - out["images"]).abs().max() <= 1e-4


def test_unexportable_combinations_say_why(assets, tmp_path):
    """Text-to-image on a VQ f4 autoencoder: LDMTextToImagePipeline needs f8, DDIM, 77 tokens, no mask."""
    from diffusers import VQModel

    torch.manual_seed(0)
    VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), latent_channels=4,
            norm_num_groups=8, sample_size=16, num_vq_embeddings=32).save_pretrained(str(tmp_path / "vq"))
    r = run_cli("train", "t2i_ddpm_digits", *SMALL_UNET, f"model.latent.autoencoder={tmp_path / 'vq'}",
                f"data.shards={assets / 'digits'}", "train.batch_size=8", "train.max_steps=1", "train.sample_every=0",
                "train.checkpoint_every=1", "train.progress_bar=false", "eval.digits=false",
                f"run.output_dir={tmp_path}", "run.name=vq", timeout=600)
    ok(r)
    r = run_cli("export", str(tmp_path / "vq"), "--out", str(tmp_path / "out"), timeout=600)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "LDMTextToImagePipeline" in err and "downsamples by 4, not 8" in err and "77 tokens" in err, err


def test_vq_f8_text_model_exports_ldm_text_to_image(tmp_path):
    """The one case LDMTextToImagePipeline runs: an f8 VQModel, DDIM, CLIP text, 77 tokens, no mask."""
    from diffusers import VQModel

    from gentrain.data_pipeline.sources import build_source
    from gentrain.train.runs import load_trained

    build_source("shapes", str(tmp_path / "shapes"), size=32, count=16, max_samples=16)
    torch.manual_seed(0)
    VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
            norm_num_groups=8, sample_size=32, num_vq_embeddings=32).save_pretrained(str(tmp_path / "vq"))
    make_tiny_clip(tmp_path / "clip")
    r = run_cli("train", "t2i_ddpm_digits", *SMALL_UNET, f"model.latent.autoencoder={tmp_path / 'vq'}",
                f"model.latent.text_encoder={tmp_path / 'clip'}", "model.latent.max_length=77",
                f"data.shards={tmp_path / 'shapes'}", "data.image_size=32", "data.channels=3", "train.batch_size=4",
                "train.max_steps=2", "train.sample_every=0", "train.checkpoint_every=2", "train.progress_bar=false",
                "eval.digits=false", f"run.output_dir={tmp_path}", "run.name=ldm", timeout=600)
    ok(r)
    r = run_cli("export", str(tmp_path / "ldm"), "--out", str(tmp_path / "export"), timeout=600)
    ok(r)
    prompts = ["a small red circle", "a large blue square above a small green triangle"]
    (name, sched, _), out = stock(tmp_path / "export", tmp_path, prompt=prompts, num_inference_steps=6,
                                  guidance_scale=3.0, height=32, width=32, output_type="np")
    assert (name, sched) == ("LDMTextToImagePipeline", "DDIMScheduler")
    _, objective, _ = load_trained(tmp_path / "ldm")
    ours = objective.sample(2, {"prompts": prompts}, generator=torch.Generator().manual_seed(0), guidance_scale=3.0,
                            timesteps=out["timesteps"])
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (ours - out["images"]).abs().max() <= 1e-4
