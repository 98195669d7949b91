"""Exports of the text-conditioned latent transformers (issue 32 item 2): the cross-attention DiT (pixart) as a
PixArtSigmaPipeline with MiniLM in its T5 slot (flow, and the diffusion family with its DDIM scheduler), the MMDiT conditioned on two tiny CLIPs as a
StableDiffusion3Pipeline without T5; both reloaded by stock diffusers in one fresh process that never imports
gentrain, drawing the latents gentrain's sampler draws from the same seed on the scheduler's grid
(max |diff| printed, <= 1e-4). A MiniLM-conditioned MMDiT has no stock pipeline: export refuses it in one
line and leaves nothing behind, `gentrain sample` draws from it. Runs are trained once per module."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, make_tiny_vae, ok, run_cli
from tiny_pipelines_sd3 import make_tiny_clip_with_projection

pytestmark = pytest.mark.t2i

PROMPTS = ["a handwritten digit 7", "the number three", ""]
STEPS, GUIDANCE, LENGTH = 4, 3.0, 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("t2i_dit_exports")
    build_source("digits", str(root / "digits"), size=16, count=64, max_samples=32)
    make_tiny_vae(root / "vae", 1, (8, 16), 16, 0.7)          # f2: 8x8 latents
    make_tiny_clip_with_projection(root / "clip_l", 16, seed=2)
    make_tiny_clip_with_projection(root / "clip_g", 32, seed=3)
    return root


def train(root, preset, name, *extra):
    r = run_cli("train", preset, "model.dit_layers=1", "model.dit_heads=2", "model.dit_head_dim=8",
                "model.patch_size=2", f"model.latent.autoencoder={root / 'vae'}", f"model.latent.max_length={LENGTH}",
                f"data.shards={root / 'digits'}", "data.image_size=16", "data.channels=1", "data.mode=epoch",
                "eval.shapes=false", "train.batch_size=4", "train.max_steps=2", "train.warmup_steps=0",
                "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2", "train.progress_bar=false",
                *extra, f"run.output_dir={root}", f"run.name={name}", timeout=600)
    ok(r)
    return root / name


@pytest.fixture(scope="module")
def pixart_run(assets):
    return train(assets, "t2i_pixart_shapes", "pixart")


@pytest.fixture(scope="module")
def pixart_ddpm_run(assets):
    """The diffusion family's PixArt (t2i_ddpm_digits's maths: v-prediction, DDIM) on the same assets."""
    return train(assets, "t2i_ddpm_digits", "pixart_ddpm", "model.net=pixart", "eval.digits=false")


@pytest.fixture(scope="module")
def mmdit_minilm_run(assets):
    return train(assets, "t2i_mmdit_shapes", "mmdit_minilm")


@pytest.fixture(scope="module")
def mmdit_clip_run(assets):
    return train(assets, "t2i_mmdit_shapes", "mmdit_clip", f"model.latent.text_encoder={assets / 'clip_l'}",
                 f"model.latent.text_encoder_2={assets / 'clip_g'}")


# one fresh interpreter for every export (stock diffusers only): per folder, the warnings from_pretrained and
# the call log, whether a plain from_pretrained refuses it (where it needs arguments), the classes loaded
STOCK = """
import io, json, logging, sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
log = io.StringIO()
handler = logging.StreamHandler(log)
for name in ("diffusers", "transformers"):
    logging.getLogger(name).addHandler(handler)
reports = {}
for job in json.loads(sys.argv[1]):
    refused = None
    if job["load_kw"]:   # the arguments are needed: a plain from_pretrained refuses the folder
        try:
            DiffusionPipeline.from_pretrained(job["folder"])
        except Exception as e:
            refused = f"{type(e).__name__}: {e}"
    log.seek(0), log.truncate()
    pipe = DiffusionPipeline.from_pretrained(job["folder"], **job["load_kw"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(job["prompts"], num_inference_steps=%d, guidance_scale=%s, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="latent", **job["call_kw"]).images
    pipe.scheduler.set_timesteps(%d)
    save_file({"latents": out.contiguous(), "sigmas": getattr(pipe.scheduler, "sigmas", torch.zeros(0)).contiguous(),
               "timesteps": pipe.scheduler.timesteps.contiguous()}, job["out"])
    reports[job["folder"]] = {"warnings": [w for w in log.getvalue().splitlines() if w.strip()], "refused": refused,
                              "classes": [type(pipe).__name__, type(pipe.scheduler).__name__,
                                          type(pipe.text_encoder).__name__]}
assert "gentrain" not in sys.modules
print(json.dumps(reports))
""" % (STEPS, GUIDANCE, STEPS)


@pytest.fixture(scope="module")
def stock(pixart_run, pixart_ddpm_run, mmdit_clip_run, tmp_path_factory):
    """{run: (gentrain_export.json, the fresh process's report, its latents and the scheduler's grid)}."""
    root, jobs, infos = tmp_path_factory.mktemp("stock"), [], {}
    runs = (pixart_run, pixart_ddpm_run, mmdit_clip_run)
    for run in runs:
        out = root / run.name
        ok(run_cli("export", str(run), "--out", str(out), timeout=600))
        infos[run] = json.loads((out / "gentrain_export.json").read_text())
        jobs.append({"folder": str(out), "prompts": PROMPTS, "load_kw": infos[run].get("load_kwargs", {}),
                     "call_kw": infos[run]["call_kwargs"], "out": str(root / f"{run.name}.safetensors")})
    p = ok(subprocess.run([sys.executable, "-c", STOCK, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600, env=cli_env(), cwd=root))
    reports = json.loads(p.stdout.splitlines()[-1])
    return {run: (infos[run], reports[str(root / run.name)], load_file(str(root / f"{run.name}.safetensors")))
            for run in runs}


def gentrain_draws(run, stock):
    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    grid = {"sigmas": stock["sigmas"]} if stock["sigmas"].numel() else {}   # flow: the scheduler's sigmas too
    return objective.sample(len(PROMPTS), {"prompts": PROMPTS}, generator=torch.Generator().manual_seed(0),
                            guidance_scale=GUIDANCE, timesteps=stock["timesteps"], decode=False, **grid)


def test_pixart_exports_to_pixart_sigma_and_draws_the_same(pixart_run, stock):
    info, report, stock = stock[pixart_run]
    assert info["diffusers_class"] == "PixArtSigmaPipeline"
    assert info["call_kwargs"] == {"use_resolution_binning": False, "max_sequence_length": LENGTH,
                                   "clean_caption": False}
    assert report["classes"] == ["PixArtSigmaPipeline", "DPMSolverMultistepScheduler", "BertModel"]
    # MiniLM in the T5 slot: the one warning from_pretrained logs (measured), nothing else
    print("reload warnings:", report["warnings"])
    assert report["warnings"] == ["Expected types for text_encoder: (<class 'transformers.models.t5.modeling_t5."
                                  "T5EncoderModel'>,), got <class 'transformers.models.bert.modeling_bert.BertModel'>."]
    diff = float((gentrain_draws(pixart_run, stock) - stock["latents"]).abs().max())
    print(f"PixArtSigmaPipeline vs gentrain, {STEPS} steps, guidance {GUIDANCE}: max |diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_diffusion_family_pixart_exports_with_its_ddim_scheduler_and_draws_the_same(pixart_ddpm_run, stock):
    info, report, stock = stock[pixart_ddpm_run]
    assert info["family"] == "diffusion" and info["diffusers_class"] == "PixArtSigmaPipeline"
    assert report["classes"] == ["PixArtSigmaPipeline", "DDIMScheduler", "BertModel"]
    diff = float((gentrain_draws(pixart_ddpm_run, stock) - stock["latents"]).abs().max())
    print(f"PixArtSigmaPipeline (diffusion, DDIM) vs gentrain, {STEPS} steps, guidance {GUIDANCE}: max |diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_mmdit_on_two_clips_exports_to_sd3_without_t5_and_draws_the_same(mmdit_clip_run, stock):
    info, report, stock = stock[mmdit_clip_run]
    assert info["diffusers_class"] == "StableDiffusion3Pipeline"
    assert info["load_kwargs"] == {"text_encoder_3": None, "tokenizer_3": None}
    assert info["call_kwargs"] == {"max_sequence_length": LENGTH}
    assert report["classes"] == ["StableDiffusion3Pipeline", "DPMSolverMultistepScheduler",
                                 "CLIPTextModelWithProjection"]
    print("reload warnings:", report["warnings"])
    diff = float((gentrain_draws(mmdit_clip_run, stock) - stock["latents"]).abs().max())
    print(f"StableDiffusion3Pipeline vs gentrain, {STEPS} steps, guidance {GUIDANCE}: max |diff| = {diff:.2e}")
    assert diff <= 1e-4
    print("plain from_pretrained:", report["refused"])
    assert "text_encoder_3" in report["refused"]   # without the two None arguments stock diffusers refuses it


def test_minilm_mmdit_export_is_refused_in_one_line_and_sample_serves_it(mmdit_minilm_run, tmp_path):
    out = tmp_path / "export"
    r = run_cli("export", str(mmdit_minilm_run), "--out", str(out), timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if "StableDiffusion3Pipeline" in x]
    assert len(lines) == 1 and "two CLIPTextModelWithProjection" in lines[0] and "gentrain sample" in lines[0]
    assert "Traceback" not in r.stderr and not out.exists()
    out.mkdir()   # an empty folder given as --out stays empty
    assert run_cli("export", str(mmdit_minilm_run), "--out", str(out), timeout=600).returncode == 2
    assert not any(out.iterdir())
    r = ok(run_cli("sample", str(mmdit_minilm_run), "--prompt", "a handwritten digit 7", "-n", "2", "--steps", "2",
                   "--out", str(tmp_path / "s.png"), timeout=600))
    assert json.loads(r.stdout.splitlines()[-1])["shape"] == [2, 1, 16, 16]
    assert load_file(str(tmp_path / "s.safetensors"))["samples"].isfinite().all()


@pytest.mark.parametrize("extra, message", [
    (("model.net=pixart",), "config key 'model.latent.text_encoder_2': SD3's two-CLIP conditioning is for "
                            "model.net=mmdit (this is 'pixart')"),
    (("model.latent.text_encoder={plain}",), "holds a CLIPTextModel, but SD3's conditioning (model.latent."
                                             "text_encoder_2 set) needs a CLIPTextModelWithProjection there"),
])
def test_two_clip_conditioning_refuses_bad_configs_in_one_line(assets, tmp_path, extra, message):
    from conftest import make_tiny_clip

    plain = make_tiny_clip(tmp_path / "plain", hidden=16)
    r = run_cli("train", "t2i_mmdit_shapes", f"model.latent.autoencoder={assets / 'vae'}",
                f"model.latent.text_encoder={assets / 'clip_l'}", f"model.latent.text_encoder_2={assets / 'clip_g'}",
                f"data.shards={assets / 'digits'}", "data.image_size=16", "data.channels=1",
                *[e.format(plain=plain) for e in extra], f"run.output_dir={tmp_path}", "run.name=bad", timeout=600)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_sd3_encoders_with_t5_encode_as_the_pipeline_does(assets, tmp_path):
    """With a T5 (text_encoder_3): states (B, 2 * max_length, T5 width), pooled (B, 16 + 32), equal to what a
    StableDiffusion3Pipeline built on the same parts computes."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_pipelines_sd3 import T5_DIM, make_tiny_t5

    from gentrain.objectives.sd3_text import SD3TextEncoders

    enc = SD3TextEncoders(str(assets / "clip_l"), str(assets / "clip_g"), str(make_tiny_t5(tmp_path / "t5")), LENGTH)
    emb, pooled = enc(PROMPTS)
    assert (enc.dim, enc.pooled_dim, tuple(emb.shape), tuple(pooled.shape)) == \
        (T5_DIM, 48, (3, 2 * LENGTH, T5_DIM), (3, 48))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                        pooled_projection_dim=48, caption_projection_dim=16, pos_embed_max_size=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=None, vae=None, **enc.parts())
    ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=LENGTH)
    assert torch.equal(emb, ref) and torch.equal(pooled, ref_pooled)
    assert emb[:, LENGTH:].abs().sum() > 0        # T5's states, not the zeros that stand in without it
