"""Fine-tuning a SanaPipeline (family `finetune`, adapters/sana.py) on a tiny random Sana built in code
(tiny_pipelines_sana.py): the training step is train_dreambooth_lora_sana.py's step (Gemma states and mask
from encode_prompt, DC-AE latents times the scaling factor, the FlowMatchEuler grid the script builds from the
scheduler folder), LoRA on the transformer through the CLI, stop and resume bit for bit, text-encoder adapters
refused in one line, the export through SanaPipeline.save_lora_weights, and stock diffusers in a fresh process
without gentrain drawing what gentrain draws."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import ok, read_metrics, run_cli
from tiny_pipelines_common import build_finetune, digits_beside, finetune_common, stock_vs_gentrain
from tiny_pipelines_sana import SIZE, shared_sana_pipeline

pytestmark = pytest.mark.finetune

COMMON = finetune_common(SIZE, "model.gradient_checkpointing=false", "model.weighting_scheme=none")
LORA = ["model.lora.rank=4", "model.lora.alpha=2", "model.lora.targets=[]", "train.lr=1e-2", "train.max_steps=4", "train.checkpoint_every=2",
        "train.sample_every=4", "model.export_fused=true"]
PROMPTS = ["a 3", "a seven"]


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    return digits_beside(tmp_path_factory, "finetune_sana", SIZE, 32, shared_sana_pipeline(tmp_path_factory))


def build(root, pipe, *overrides):
    return build_finetune(root, pipe, *COMMON, *overrides)


def test_the_training_step_is_the_sana_scripts_step(sana):
    """The loss gentrain computes on a batch is, to float precision, the one train_dreambooth_lora_sana.py's step
    computes from the same random stream: encode_prompt's Gemma states and mask (300 tokens, no complex human
    instruction) passed as encoder_attention_mask, AutoencoderDC latents times scaling_factor, noise, u from the
    density, the sigma and timestep of FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives.base import Runtime

    root, pipe_dir = sana
    obj = build(root, pipe_dir, "model.lora.rank=0", "model.cfg_dropout=0")
    assert type(obj.adapter).__name__ == "SanaAdapter" and obj.sigma_grid is not None and obj.space.kind == "dc"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, SIZE, SIZE, generator=g) * 2 - 1
    batch = {"image": images, "txt": ["a 3", "the digit seven", "a photo of the digit one"], "key": ["0", "1", "2"]}
    obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(5))))
    with torch.no_grad():
        loss = float(obj.loss("main", batch)[0])

    pipe = SanaPipeline.from_pretrained(str(pipe_dir))
    torch.set_grad_enabled(False)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(pipe_dir), subfolder="scheduler")
    g = torch.Generator().manual_seed(5)
    x0 = pipe.vae.encode(images).latent * pipe.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling("none", 3, 0.0, 1.0, 1.29, generator=g)
    idx = (u * sched.config.num_train_timesteps).long()
    timesteps, sigmas = sched.timesteps[idx], sched.sigmas[idx].view(-1, 1, 1, 1)
    emb, mask, _, _ = pipe.encode_prompt(batch["txt"], do_classifier_free_guidance=False, max_sequence_length=300,
                                         complex_human_instruction=None)
    pred = pipe.transformer(hidden_states=(1 - sigmas) * x0 + sigmas * noise, encoder_hidden_states=emb,
                            encoder_attention_mask=mask, timestep=timesteps, return_dict=False)[0]
    unmasked = pipe.transformer(hidden_states=(1 - sigmas) * x0 + sigmas * noise, encoder_hidden_states=emb,
                                timestep=timesteps, return_dict=False)[0]
    torch.set_grad_enabled(True)
    ref = float(((pred - (noise - x0)) ** 2).mean())
    print(f"\ngentrain's Sana loss {loss:.7f}, the script's {ref:.7f}; without the mask "
          f"{float(((unmasked - (noise - x0)) ** 2).mean()):.7f}")
    assert abs(loss - ref) <= 1e-6 * max(1.0, ref), (loss, ref)
    assert float((pred - unmasked).abs().max()) > 1e-4     # the mask matters: padded Gemma states are hidden
    assert sched.config.shift == 1.0 and torch.allclose(sigmas.flatten(), timesteps / 1000)   # unshifted
    assert obj.guidance_scale == 4.5                         # SanaPipeline.__call__'s default


FRESH = """
import json, sys, torch
from diffusers import SanaPipeline
base, out, prompts = sys.argv[1], sys.argv[2], ["a 3", "a seven"]
def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, height=32, width=32, num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                complex_human_instruction=None, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0)).images
imgs = {"base": draw(SanaPipeline.from_pretrained(base))}
pipe = SanaPipeline.from_pretrained(base)
pipe.load_lora_weights(out)
imgs["lora"] = draw(pipe)
pipe.disable_lora()
imgs["lora_off"] = draw(pipe)
imgs["fused"] = draw(SanaPipeline.from_pretrained(out + "/fused"))
torch.save(imgs, out + "/fresh.pt")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gentrain"))))
"""


@pytest.mark.slow
def test_lora_on_the_transformer_resumes_exports_and_loads_in_stock_diffusers(sana, tmp_path):
    root, pipe = sana
    args = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON, *LORA,
            f"run.output_dir={tmp_path}"]
    # text-encoder adapters: SanaPipeline.load_lora_weights takes the transformer's only
    r = run_cli(*args, "run.name=te", "model.text_encoder_lora.rank=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "config key 'model.text_encoder_lora.rank': SanaPipeline's load_lora_weights" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "te").exists()

    ok(run_cli(*args, "run.name=straight"))
    run = tmp_path / "straight"
    ck = run / "checkpoints" / "step_4"
    files = sorted(p.name for p in ck.glob("model*.safetensors"))
    with safe_open(str(ck / files[0]), "pt") as h:
        keys = list(h.keys())
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    attns = {k.split(".lora_")[0].split(".")[-2] for k in keys}
    assert len(files) == 1 and all(".lora_A." in k or ".lora_B." in k for k in keys), (files, keys[:4])
    assert targets == {"to_q", "to_k", "to_v"} and attns == {"attn1", "attn2"}, (targets, attns)

    # stop at 2, resume: the same losses bit for bit and the same adapter file
    ok(run_cli(*args, "run.name=split", "--stop-at", "2"))
    ok(run_cli(*args, "run.name=split", "--resume", "auto"))
    losses = [{r["step"]: r["loss/main"] for r in read_metrics(d) if "loss/main" in r} for d in (run, tmp_path / "split")]
    assert all(losses[0][s] == losses[1][s] for s in (3, 4)), losses
    assert (ck / files[0]).read_bytes() == (tmp_path / "split" / "checkpoints" / "step_4" / files[0]).read_bytes()

    out = tmp_path / "export"
    ok(run_cli("export", str(run), "--out", str(out)))
    info = json.loads((out / "gentrain_export.json").read_text())
    assert info["kind"] == "lora" and info["fused"] == "fused" and "kohya_file" not in info, info
    assert info["kohya_skipped"].startswith("SanaPipeline: no kohya format"), info
    assert info["scheduler"] == "DPMSolverMultistepScheduler" and info["prediction"] == "flow", info
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        keys, meta = list(h.keys()), json.loads(h.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == {"transformer"} and meta["transformer.lora_alpha"] == 2, (keys[:2], meta)

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    imgs, diff = stock_vs_gentrain(FRESH, pipe, out, objective, PROMPTS, steps=2, guidance=3.0)
    print("\nmax |stock - gentrain| (Sana LoRA):", diff)
    assert diff["lora"] <= 1e-5 and diff["fused"] <= 1e-4, diff             # the exports draw what gentrain draws
    assert float((imgs["lora_off"] - imgs["base"]).abs().max()) <= 1e-6    # adapters off = the base
    assert diff["base"] > 1e-3, diff                                        # the adapters matter


@pytest.mark.slow
def test_cached_gemma_states_and_masks_train_the_same_losses(sana, tmp_path):
    """`gentrain data cache --pretrained` writes the DC-AE latents and encode_prompt's Gemma states and masks; a
    run on them trains the losses of the run on the images (Gemma stays loaded: the previews encode with it). At
    lr 1e-4: at 1e-2 Adam's first sign-like steps turn the encoders' batching noise into 4.5e-4 by step 2."""
    from conftest import reset_accelerate_state, train_here
    from gentrain.launch.cli import main

    root, pipe = sana
    reset_accelerate_state()
    assert main(["data", "cache", "--shards", str(root / "digits"), "--out", str(tmp_path / "cached"), "--pretrained",
                 str(pipe), "--image-size", str(SIZE), "--channels", "1", "--batch-size", "5"]) == 0
    reset_accelerate_state()
    meta = json.loads((tmp_path / "cached" / "index.json").read_text())["cache"]
    assert meta["cond"] == ["emb", "mask"] and meta["pipeline"]["class"] == "SanaPipeline", meta
    run = [*COMMON, "model.lora.rank=4", "model.lora.targets=[]", "model.cfg_dropout=0.3", "train.lr=1e-4",
           "train.max_steps=3", "train.checkpoint_every=1000", "train.sample_every=0", "train.seed=7"]
    losses = []
    for name, shards in (("images", root / "digits"), ("cached", tmp_path / "cached")):
        trainer = train_here("finetune_t2i_lora", tmp_path / "runs", name, f"model.pretrained={pipe}",
                             f"data.shards={shards}", *run)
        losses.append([r["loss/main"] for r in read_metrics(tmp_path / "runs" / name) if "loss/main" in r])
        assert (trainer.objective.cached is not None) == (name == "cached")
    print("\nSana losses on images / on the cache:", losses)
    assert len(losses[0]) == 3 and all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(*losses)), losses
