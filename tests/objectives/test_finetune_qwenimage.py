"""Fine-tuning a QwenImagePipeline (family `finetune`, adapters/qwenimage.py) on a tiny random Qwen-Image built in
code (tiny_pipelines_qwenimage.py): the training step is train_dreambooth_lora_qwen_image.py's step (the VLM's
states and mask, per-channel latents_mean / latents_std on the VAE's one-frame latents, 2x2 packing, the
scheduler's unshifted training sigmas), LoRA on the transformer through the CLI (text-encoder adapters refused),
stop and resume bit for bit, the export through QwenImagePipeline.save_lora_weights, and stock diffusers in a
fresh process without gentrain drawing what gentrain draws."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import ok, read_metrics, run_cli
from tiny_pipelines_common import build_finetune, digits_beside, finetune_common, stock_vs_gentrain
from tiny_pipelines_qwenimage import SIZE, shared_qwenimage_pipeline

pytestmark = pytest.mark.finetune

COMMON = finetune_common(SIZE, "model.weighting_scheme=none")
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "train.lr=1e-2", "model.export_kohya=true", "train.max_steps=4", "train.checkpoint_every=2",
        "train.sample_every=4", "model.export_fused=true"]
PROMPTS = ["a 3", "a seven"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return digits_beside(tmp_path_factory, "finetune_qwenimage", SIZE, 32, shared_qwenimage_pipeline(tmp_path_factory))


def build(root, pipe, *overrides):
    return build_finetune(root, pipe, *COMMON, "model.gradient_checkpointing=false", *overrides)


def test_the_training_step_is_the_qwen_image_scripts_step(qwen):
    """The loss gentrain computes on a batch is, to float precision, the one train_dreambooth_lora_qwen_image.py's
    step computes from the same random stream: posterior sample of the one-frame latents, (z - mean) / std per
    channel, noise, uniform u (weighting none), the scheduler's sigma and timestep at (u * 1000) on its unshifted
    dynamic-shift grid (the script's shift=3.0 is never applied), packed input, timestep / 1000, velocity target.
    Captions of different lengths: the mask goes in as the pipeline gives it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from gentrain.errors import GentrainError
    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives.base import Runtime

    root, pipe_dir = qwen
    obj = build(root, pipe_dir, "model.lora.rank=0", "model.cfg_dropout=0")
    assert type(obj.adapter).__name__ == "QwenImageAdapter" and obj.sigma_grid is not None
    assert obj.guidance_scale == 4.0                  # QwenImagePipeline's true_cfg_scale default
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, SIZE, SIZE, generator=g) * 2 - 1
    batch = {"image": images, "txt": ["a 3", "a seven", "a 1 2"], "key": ["0", "1", "2"]}
    obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(5))))
    with torch.no_grad():
        loss = float(obj.loss("main", batch)[0])

    pipe = QwenImagePipeline.from_pretrained(str(pipe_dir))
    torch.set_grad_enabled(False)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(pipe_dir), subfolder="scheduler", shift=3.0)
    c = pipe.vae.config
    mean, inv_std = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1), 1 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(inv_std, torch.ones(1))
    g = torch.Generator().manual_seed(5)
    post = pipe.vae.encode(images.unsqueeze(2)).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    x0 = (z - mean) * inv_std
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling("none", 3, 0.0, 1.0, 1.29, generator=g)
    idx = (u * sched.config.num_train_timesteps).long()
    timesteps, sigmas = sched.timesteps[idx], sched.sigmas[idx].view(-1, 1, 1, 1, 1)
    emb, mask = pipe.encode_prompt(batch["txt"], max_sequence_length=512)
    assert mask is not None and not mask.all()       # the three captions differ in length
    noisy = ((1 - sigmas) * x0 + sigmas * noise).permute(0, 2, 1, 3, 4)
    h = x0.shape[-1]
    packed = QwenImagePipeline._pack_latents(noisy, 3, x0.shape[1], h, h)
    pred = pipe.transformer(hidden_states=packed, encoder_hidden_states=emb, encoder_hidden_states_mask=mask,
                            timestep=timesteps / 1000, img_shapes=[(1, h // 2, h // 2)] * 3, return_dict=False)[0]
    pred = QwenImagePipeline._unpack_latents(pred, SIZE, SIZE, pipe.vae_scale_factor)
    torch.set_grad_enabled(True)
    ref = float(((pred - (noise - x0)) ** 2).mean())
    print(f"\ngentrain's Qwen-Image loss {loss:.7f}, the script's {ref:.7f}")
    assert abs(loss - ref) <= 1e-6 * max(1.0, ref), (loss, ref)

    # the cond gentrain encodes is encode_prompt's, zero-padded to 512 tokens with mask 0
    cond = obj.encode(batch["txt"])
    assert cond["emb"].shape[1] == cond["mask"].shape[1] == 512
    n = emb.shape[1]
    assert torch.equal(cond["emb"][:, :n], emb) and torch.equal(cond["mask"][:, :n], mask.float())
    assert not cond["emb"][:, n:].any() and not cond["mask"][:, n:].any()

    with pytest.raises(GentrainError, match="'model.text_encoder_lora.rank': QwenImagePipeline's load_lora_weights"):
        build(root, pipe_dir, "model.lora.rank=4", "model.text_encoder_lora.rank=2")


FRESH = """
import json, sys, torch
from diffusers import QwenImagePipeline
base, out, prompts = sys.argv[1], sys.argv[2], ["a 3", "a seven"]
def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, negative_prompt=["", ""], true_cfg_scale=3.0, height=16, width=16,
                num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
imgs = {"base": draw(QwenImagePipeline.from_pretrained(base))}
pipe = QwenImagePipeline.from_pretrained(base)
pipe.load_lora_weights(out)
imgs["lora"] = draw(pipe)
pipe.disable_lora()
imgs["lora_off"] = draw(pipe)
imgs["fused"] = draw(QwenImagePipeline.from_pretrained(out + "/fused"))
torch.save(imgs, out + "/fresh.pt")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gentrain"))))
"""


@pytest.mark.slow
def test_lora_on_the_transformer_resumes_exports_and_loads_in_stock_diffusers(qwen, tmp_path):
    """Through the hub-sized preset (finetune_qwenimage_lora: its targets, gradient checkpointing, 8-bit AdamW or
    its fallback, grad_accum 4), only sizes, steps, lr, alpha and the pipeline overridden."""
    root, pipe = qwen
    args = ["train", "finetune_qwenimage_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON, *LORA,
            f"run.output_dir={tmp_path}"]
    r = run_cli(*args, "run.name=refused", "model.text_encoder_lora.rank=2")
    assert r.returncode == 2 and "'model.text_encoder_lora.rank'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "refused").exists()

    ok(run_cli(*args, "run.name=straight"))
    run = tmp_path / "straight"
    ck = run / "checkpoints" / "step_4"
    files = sorted(p.name for p in ck.glob("model*.safetensors"))
    assert len(files) == 1, files                     # the transformer's adapters only
    with safe_open(str(ck / files[0]), "pt") as h:
        keys = list(h.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:4]
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys} == {"to_q", "to_k", "to_v", "0"}, keys[:8]

    # stop at 2, resume: the same losses bit for bit and the same adapter files
    ok(run_cli(*args, "run.name=split", "--stop-at", "2"))
    ok(run_cli(*args, "run.name=split", "--resume", "auto"))
    losses = [{r["step"]: r["loss/main"] for r in read_metrics(d) if "loss/main" in r} for d in (run, tmp_path / "split")]
    assert all(losses[0][s] == losses[1][s] for s in (3, 4)), losses
    assert (ck / files[0]).read_bytes() == (tmp_path / "split" / "checkpoints" / "step_4" / files[0]).read_bytes()

    out = tmp_path / "export"
    ok(run_cli("export", str(run), "--out", str(out)))
    info = json.loads((out / "gentrain_export.json").read_text())
    assert info["kind"] == "lora" and info["fused"] == "fused" and "kohya_file" not in info, info
    assert info["kohya_skipped"].startswith("QwenImagePipeline: no kohya format"), info
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        keys, meta = list(h.keys()), json.loads(h.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == {"transformer"} and meta["transformer.lora_alpha"] == 8, meta

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    imgs, diff = stock_vs_gentrain(FRESH, pipe, out, objective, PROMPTS, steps=2, guidance=3.0)
    print("\nmax |stock - gentrain| (Qwen-Image LoRA):", diff)
    assert diff["lora"] <= 1e-5 and diff["fused"] <= 1e-4, diff             # the exports draw what gentrain draws
    assert float((imgs["lora_off"] - imgs["base"]).abs().max()) <= 1e-6    # adapters off = the base
    assert diff["base"] > 1e-3, diff                                        # the adapters matter


@pytest.mark.slow
def test_a_cached_run_trains_the_image_runs_losses_without_the_vlm(qwen, tmp_path):
    """`gentrain data cache --pretrained` stores the VAE's one-frame posteriors and encode_prompt's states and masks
    (padded to 512); the run on them trains the image run's losses without loading the Qwen2.5-VL, and its previews
    encode their prompts on the host: the stock pipeline with the encoder draws the same images."""
    from diffusers import QwenImagePipeline
    from test_finetune_cached import RUN, cache, losses_on_images_and_cache

    root, pipe = qwen
    meta = cache(root / "digits", tmp_path / "cached", pipe)
    assert meta["pipeline"]["class"] == "QwenImagePipeline" and meta["cond"] == ["emb", "mask"], meta
    images, cached = losses_on_images_and_cache(tmp_path, pipe, root / "digits", tmp_path / "cached",
                                                "model.weighting_scheme=none")
    assert "train.sample_every=0" in RUN and images.adapter.parts["text_encoder"] is not None
    assert cached.adapter.parts["text_encoder"] is None and cached.adapter.parts["tokenizer"] is None   # no VLM
    mine = cached.sample(2, {"prompts": PROMPTS}, generator=torch.Generator().manual_seed(0), steps=2,
                         guidance_scale=3.0)
    assert cached.adapter.parts["text_encoder"] is None and cached.adapter._host_encoder is not None
    stock = QwenImagePipeline.from_pretrained(str(pipe), transformer=cached.adapter.parts["transformer"])
    stock.set_progress_bar_config(disable=True)
    ref = stock(prompt=PROMPTS, negative_prompt=["", ""], true_cfg_scale=3.0, height=SIZE, width=SIZE,
                num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images * 2 - 1
    print("\nmax |cached run's preview - stock pipeline with the VLM|:", float((mine - ref).abs().max()))
    assert float((mine - ref).abs().max()) <= 1e-5
