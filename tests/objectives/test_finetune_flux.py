"""Fine-tuning a FluxPipeline (family `finetune`, adapters/flux.py) on a tiny random FLUX.1-dev-shaped pipeline built
in code (tiny_pipelines_flux.py): the training step is train_dreambooth_lora_flux.py's step (packing, position ids,
guidance embedding, unshifted training sigmas of a dynamic-shift scheduler), LoRA on the transformer and CLIP (never
T5) through the CLI, stop and resume bit for bit, the exports (FluxPipeline.save_lora_weights' file and the file
with float alpha tensors, its keys checked against ComfyUI's key mapping), stock diffusers in a fresh process
without gentrain drawing what gentrain draws, a run on cached encodings without T5, and a full fine-tune."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import ok, read_metrics, run_cli
from tiny_pipelines_common import build_finetune, digits_beside, finetune_common, stock_vs_gentrain
from tiny_pipelines_flux import SIZE, shared_flux_pipeline

pytestmark = [pytest.mark.finetune, pytest.mark.slow]

COMMON = finetune_common(SIZE, "model.gradient_checkpointing=false", "model.weighting_scheme=none",
                         "model.guidance_scale=3.5")
LORA = ["model.lora.rank=4", "model.lora.alpha=2", "model.text_encoder_lora.rank=2", "model.text_encoder_lora.alpha=4",
        "train.lr=1e-2", "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=4"]
PROMPTS = ["a 3", "a 7"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return digits_beside(tmp_path_factory, "finetune_flux", SIZE, 24, shared_flux_pipeline(tmp_path_factory))


def build(root, pipe, *overrides):
    return build_finetune(root, pipe, *COMMON, *overrides)


def test_the_training_step_is_the_flux_scripts_step(flux, tmp_path):
    """The loss gentrain computes on a batch is, to float precision, the one train_dreambooth_lora_flux.py's step
    computes from the same random stream: posterior sample, (z - shift) * scale, noise, u, the scheduler's
    (unshifted: dynamic shifting) sigma and timestep at (u * 1000), 2x2 packing with image ids, the transformer at
    timestep / 1000 and guidance 3.5, unpacked, velocity target. A full fine-tune's export loads in diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives.base import Runtime

    root, pipe_dir = flux
    obj = build(root, pipe_dir, "model.lora.rank=0", "model.cfg_dropout=0", "model.train_guidance=2.5")
    assert type(obj.adapter).__name__ == "FluxAdapter" and obj.sigma_grid is not None
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, SIZE, SIZE, generator=g) * 2 - 1
    batch = {"image": images, "txt": ["a 3", "a 7", "a 1"], "key": ["0", "1", "2"]}
    obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(5))))
    with torch.no_grad():
        loss = float(obj.loss("main", batch)[0])

    pipe = FluxPipeline.from_pretrained(str(pipe_dir))
    torch.set_grad_enabled(False)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(pipe_dir), subfolder="scheduler")
    # dynamic shifting: the training grid is unshifted (sigma 0.501 at index 499; shift 3.0 would make it 0.751)
    assert sched.config.use_dynamic_shifting and abs(float(obj.sigma_grid.sigmas[499]) - 0.501) < 1e-6
    g = torch.Generator().manual_seed(5)
    post = pipe.vae.encode(images).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling("none", 3, 0.0, 1.0, 1.29, generator=g)
    idx = (u * sched.config.num_train_timesteps).long()
    timesteps, sigmas = sched.timesteps[idx], sched.sigmas[idx].view(-1, 1, 1, 1)
    emb, pooled, text_ids = pipe.encode_prompt(batch["txt"], None, max_sequence_length=512)
    b, c, h, w = x0.shape
    packed = FluxPipeline._pack_latents((1 - sigmas) * x0 + sigmas * noise, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
    pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.full((b,), 2.5),
                            pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=text_ids, img_ids=ids,
                            return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)
    torch.set_grad_enabled(True)
    ref = float(((pred - (noise - x0)) ** 2).mean())
    print(f"\ngentrain's Flux loss {loss:.7f}, the script's {ref:.7f}")
    assert abs(loss - ref) <= 1e-6 * max(1.0, ref), (loss, ref)

    obj.export(tmp_path, obj.cfg)   # a full fine-tune's export: a FluxPipeline folder, its dynamic-shift scheduler
    tuned = FluxPipeline.from_pretrained(str(tmp_path))
    assert tuned.scheduler.config.use_dynamic_shifting and tuned.transformer.config.guidance_embeds


FRESH = """
import json, sys, torch
from diffusers import FluxPipeline
base, out, prompts = sys.argv[1], sys.argv[2], ["a 3", "a 7"]
def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, height=16, width=16, num_inference_steps=2, guidance_scale=3.5, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
imgs = {"base": draw(FluxPipeline.from_pretrained(base))}
pipe = FluxPipeline.from_pretrained(base)
pipe.load_lora_weights(out)
imgs["lora"] = draw(pipe)
pipe.disable_lora()
imgs["lora_off"] = draw(pipe)
alpha = FluxPipeline.from_pretrained(base)
alpha.load_lora_weights(out, weight_name="pytorch_lora_weights_alpha.safetensors")
imgs["alpha_file"] = draw(alpha)
alone = FluxPipeline.from_pretrained(base)
alone.transformer.load_lora_adapter(out, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
imgs["transformer_only"] = draw(alone)
torch.save(imgs, out + "/fresh.pt")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gentrain"))))
"""


def comfy_flux_key_map(depth: int, depth_single: int, clip_layers: int) -> set[str]:
    """The LoRA module names ComfyUI maps for a Flux model and its CLIP-L, re-implemented from comfyanonymous/ComfyUI:
    comfy/lora.py model_lora_keys_unet ("transformer.{k[:-len('.weight')]}" for each ".weight" key of
    comfy.utils.flux_to_diffusers) and model_lora_keys_clip ("text_encoder.text_model.encoder.layers.{b}.{c}" for
    the LORA_CLIP_MAP modules of clip_l); flux_to_diffusers' weight keys for the double blocks (attn.to_q/k/v,
    add_q/k/v_proj, to_out.0, to_add_out, norm1(_context).linear, ff(_context).net.0.proj / net.2, qk norms),
    the single blocks (attn.to_q/k/v, proj_mlp, norm.linear, proj_out, qk norms) and the embedders."""
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2", "attn.norm_q", "attn.norm_k", "attn.norm_added_q",
              "attn.norm_added_k"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out", "attn.norm_q", "attn.norm_k"]
    basic = ["proj_out", "x_embedder", "context_embedder", "norm_out.linear"] + \
        [f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "text", "guidance") for i in (1, 2)]
    names = {f"transformer.transformer_blocks.{i}.{m}" for i in range(depth) for m in double}
    names |= {f"transformer.single_transformer_blocks.{i}.{m}" for i in range(depth_single) for m in single}
    names |= {f"transformer.{m}" for m in basic}
    clip = ["mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj"]
    return names | {f"text_encoder.text_model.encoder.layers.{b}.{c}" for b in range(clip_layers) for c in clip}


def test_lora_on_the_transformer_and_clip_resumes_exports_and_loads_in_stock_diffusers(flux, tmp_path):
    root, pipe = flux
    args = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON, *LORA,
            f"run.output_dir={tmp_path}"]
    ok(run_cli(*args, "run.name=straight"))
    run = tmp_path / "straight"
    ck = run / "checkpoints" / "step_4"
    files, targets = sorted(p.name for p in ck.glob("model*.safetensors")), set()
    for name in files:   # adapters only: the transformer's and CLIP's (T5 stays frozen)
        with safe_open(str(ck / name), "pt") as h:
            keys = list(h.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), (name, keys[:4])
        targets |= {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert len(files) == 2 and {"to_q", "to_k", "q_proj"} <= targets, (files, targets)

    # stop at 2, resume: the same losses bit for bit and the same adapter files
    ok(run_cli(*args, "run.name=split", "--stop-at", "2"))
    ok(run_cli(*args, "run.name=split", "--resume", "auto"))
    losses = [{r["step"]: r["loss/main"] for r in read_metrics(d) if "loss/main" in r} for d in (run, tmp_path / "split")]
    assert all(losses[0][s] == losses[1][s] for s in (3, 4)), losses
    for name in files:
        assert (ck / name).read_bytes() == (tmp_path / "split" / "checkpoints" / "step_4" / name).read_bytes(), name

    out = tmp_path / "export"
    ok(run_cli("export", str(run), "--out", str(out)))
    info = json.loads((out / "gentrain_export.json").read_text())
    assert info["kind"] == "lora" and info["pipeline_class"] == "FluxPipeline", info
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        keys, meta = list(h.keys()), json.loads(h.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}, keys[:4]
    assert meta["transformer.lora_alpha"] == 2 and meta["text_encoder.lora_alpha"] == 4, meta

    # the alpha-tensor file: every adapted module a name ComfyUI maps, its lora_A / lora_B pair and a float alpha
    with safe_open(str(out / "pytorch_lora_weights_alpha.safetensors"), "pt") as h:
        alpha_sd = {k: h.get_tensor(k) for k in h.keys()}
        assert h.metadata() is None or "lora_adapter_metadata" not in h.metadata()
    modules = {k[:-len(".alpha")] for k in alpha_sd if k.endswith(".alpha")}
    assert modules == {k.split(".lora_")[0] for k in alpha_sd if ".lora_" in k}, sorted(alpha_sd)[:6]
    assert len(alpha_sd) == 3 * len(modules) and len(keys) == 2 * len(modules)
    comfy = comfy_flux_key_map(depth=1, depth_single=1, clip_layers=2)
    assert modules <= comfy, sorted(modules - comfy)
    for x in modules:
        a = alpha_sd[f"{x}.alpha"]
        assert a.dtype == torch.float32 and a.dim() == 0 and float(a) == (2.0 if x.startswith("transformer.") else 4.0)
        rank = alpha_sd[f"{x}.lora_A.weight"].shape[0]   # ComfyUI: alpha / lora_A rows, as peft's lora_alpha / r
        assert rank == (4 if x.startswith("transformer.") else 2) and alpha_sd[f"{x}.lora_B.weight"].shape[1] == rank

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    imgs, diff = stock_vs_gentrain(FRESH, pipe, out, objective, PROMPTS, steps=2, guidance=3.5)
    print("\nmax |stock - gentrain| (Flux LoRA):", diff)
    assert diff["lora"] <= 1e-5 and diff["alpha_file"] <= 1e-5, diff     # both files draw what gentrain draws
    assert float((imgs["lora_off"] - imgs["base"]).abs().max()) <= 1e-6    # adapters off = the base
    assert diff["base"] > 1e-3 and diff["transformer_only"] > 1e-4, diff    # the adapters matter, CLIP's too


def test_full_fine_tune_on_cached_encodings_trains_the_image_runs_losses_without_t5(flux):
    """`gentrain data cache --pretrained` on Flux holds T5's states and CLIP's pooled vector; a full fine-tune of the
    transformer (2 steps) on the cache trains the losses of the same run on the images, never loading T5."""
    from conftest import reset_accelerate_state, train_here
    from gentrain.launch.cli import main

    root, pipe = flux
    reset_accelerate_state()
    assert main(["data", "cache", "--shards", str(root / "digits"), "--out", str(root / "cached"), "--pretrained",
                 str(pipe), "--image-size", str(SIZE), "--channels", "1", "--batch-size", "6"]) == 0
    meta = json.loads((root / "cached" / "index.json").read_text())["cache"]
    assert meta["pipeline"]["class"] == "FluxPipeline" and meta["cond"] == ["emb", "pooled"], meta
    runs = []
    for name, shards in (("images", root / "digits"), ("cached", root / "cached")):
        trainer = train_here("finetune_t2i_lora", root / "runs", name, f"model.pretrained={pipe}",
                             f"data.shards={shards}", *COMMON, "model.lora.rank=0", "model.text_encoder_lora.rank=0",
                             "model.cfg_dropout=0.3", "train.lr=1e-3", "train.max_steps=2", "train.sample_every=0",
                             "train.checkpoint_every=1000", "model.sample_steps=1", "train.seed=7")
        rows = read_metrics(root / "runs" / name)
        runs.append(([r["loss/main"] for r in rows if "loss/main" in r] +
                     [r["val/loss"] for r in rows if "val/loss" in r], trainer.objective))
    (a, image_obj), (b, cached_obj) = runs
    print(f"\nFlux full fine-tune: losses on images {a}, on the cache {b}")
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert not image_obj.lora and image_obj.adapter.parts["text_encoder_2"] is not None
    assert cached_obj.cached is not None and cached_obj.adapter.parts["text_encoder_2"] is None   # T5 never loaded
