"""Fine-tuning a StableDiffusion3Pipeline (family `finetune`, adapters/sd3.py) on a tiny random SD3 built in
code (tiny_pipelines_sd3.py): the training step is diffusers' SD3 scripts' step, LoRA on the transformer and
both CLIPs (never T5) through the CLI, stop and resume bit for bit, the export through
StableDiffusion3Pipeline.save_lora_weights, and stock diffusers in a fresh process without gentrain drawing
what gentrain draws."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import ok, read_metrics, run_cli
from tiny_pipelines_common import build_finetune, digits_beside, finetune_common, stock_vs_gentrain
from tiny_pipelines_sd3 import SIZE, shared_sd3_pipeline

pytestmark = pytest.mark.finetune

COMMON = finetune_common(SIZE, "model.gradient_checkpointing=false")
LORA = ["model.lora.rank=4", "model.lora.alpha=2", "model.text_encoder_lora.rank=2", "model.text_encoder_lora.alpha=4",
        "train.lr=1e-2", "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=4", "model.export_fused=true"]
PROMPTS = ["a 3", "a 7"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return digits_beside(tmp_path_factory, "finetune_sd3", SIZE, 32, shared_sd3_pipeline(tmp_path_factory))


def build(root, pipe, *overrides):
    return build_finetune(root, pipe, *COMMON, *overrides)


def test_the_training_step_is_the_sd3_scripts_step(sd3, tmp_path):
    """The loss gentrain computes on a batch is, to float precision, the one train_dreambooth_lora_sd3.py's
    step computes from the same random stream: posterior sample, (z - shift) * scale, noise, u from the
    logit-normal density, the scheduler's shifted sigma and timestep at (u * 1000), velocity target."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives.base import Runtime

    root, pipe_dir = sd3
    obj = build(root, pipe_dir, "model.lora.rank=0", "model.cfg_dropout=0", "model.weighting_scheme=logit_normal",
                "model.logit_mean=0.3", "model.logit_std=0.7")
    assert type(obj.adapter).__name__ == "SD3Adapter" and obj.sigma_grid is not None
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, SIZE, SIZE, generator=g) * 2 - 1
    batch = {"image": images, "txt": ["a 3", "a 7", "a 1"], "key": ["0", "1", "2"]}
    obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(5))))
    with torch.no_grad():
        loss = float(obj.loss("main", batch)[0])

    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipe_dir))
    torch.set_grad_enabled(False)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(pipe_dir), subfolder="scheduler")
    g = torch.Generator().manual_seed(5)
    post = pipe.vae.encode(images).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling("logit_normal", 3, 0.3, 0.7, 1.29, generator=g)
    idx = (u * sched.config.num_train_timesteps).long()
    timesteps, sigmas = sched.timesteps[idx], sched.sigmas[idx].view(-1, 1, 1, 1)
    emb, _, pooled, _ = pipe.encode_prompt(batch["txt"], None, None, do_classifier_free_guidance=False,
                                           max_sequence_length=77)
    pred = pipe.transformer(hidden_states=(1 - sigmas) * x0 + sigmas * noise, timestep=timesteps,
                            encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)[0]
    torch.set_grad_enabled(True)
    ref = float(((pred - (noise - x0)) ** 2).mean())
    print(f"\ngentrain's SD3 loss {loss:.7f}, the script's {ref:.7f}")
    assert abs(loss - ref) <= 1e-6 * max(1.0, ref), (loss, ref)
    assert obj.guidance_scale == 7.0                 # StableDiffusion3Pipeline's own default, not SD's 7.5

    # a full fine-tune's export is a StableDiffusion3Pipeline folder stock diffusers loads
    obj.export(tmp_path, obj.cfg)
    tuned = StableDiffusion3Pipeline.from_pretrained(str(tmp_path))
    assert type(tuned.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and tuned.scheduler.config.shift == 3.0
    assert all(torch.equal(a, b) for a, b in zip(tuned.transformer.state_dict().values(),
                                                 pipe.transformer.state_dict().values()))

    from gentrain.errors import GentrainError

    with pytest.raises(GentrainError, match="'model.weighting_scheme': 'lognormal' is not allowed"):
        build(root, pipe_dir, "model.weighting_scheme=lognormal")
    with pytest.raises(GentrainError, match="'model.logit_std'"):
        build(root, pipe_dir, "model.logit_std=0")


FRESH = """
import json, sys, torch
from diffusers import StableDiffusion3Pipeline
base, out, prompts = sys.argv[1], sys.argv[2], ["a 3", "a 7"]
def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, height=16, width=16, num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
imgs = {"base": draw(StableDiffusion3Pipeline.from_pretrained(base))}
pipe = StableDiffusion3Pipeline.from_pretrained(base)
pipe.load_lora_weights(out)
imgs["lora"] = draw(pipe)
pipe.disable_lora()
imgs["lora_off"] = draw(pipe)
alone = StableDiffusion3Pipeline.from_pretrained(base)
alone.transformer.load_lora_adapter(out, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
imgs["transformer_only"] = draw(alone)
imgs["fused"] = draw(StableDiffusion3Pipeline.from_pretrained(out + "/fused"))
torch.save(imgs, out + "/fresh.pt")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gentrain"))))
"""


def test_lora_on_the_transformer_and_both_clips_resumes_exports_and_loads_in_stock_diffusers(sd3, tmp_path):
    root, pipe = sd3
    args = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON, *LORA,
            f"run.output_dir={tmp_path}"]
    ok(run_cli(*args, "run.name=straight"))
    run = tmp_path / "straight"
    ck = run / "checkpoints" / "step_4"
    files, targets = sorted(p.name for p in ck.glob("model*.safetensors")), set()
    for name in files:   # adapters only: the transformer's and the two CLIPs' (T5 stays frozen)
        with safe_open(str(ck / name), "pt") as h:
            keys = list(h.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), (name, keys[:4])
        targets |= {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert len(files) == 3 and {"to_q", "q_proj"} <= targets, (files, targets)

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
    assert info["kind"] == "lora" and info["fused"] == "fused" and "kohya_file" not in info, info
    assert info["kohya_skipped"].startswith("StableDiffusion3Pipeline: no kohya format"), info
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        keys, meta = list(h.keys()), json.loads(h.metadata()["lora_adapter_metadata"])
    nets = {k.split(".")[0] for k in keys}
    assert nets == {"transformer", "text_encoder", "text_encoder_2"}, nets
    assert meta["transformer.lora_alpha"] == 2 and meta["text_encoder_2.lora_alpha"] == 4, meta

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    imgs, diff = stock_vs_gentrain(FRESH, pipe, out, objective, PROMPTS, steps=2, guidance=3.0)
    print("\nmax |stock - gentrain| (SD3 LoRA):", diff)
    assert diff["lora"] <= 1e-5 and diff["fused"] <= 1e-4, diff             # the exports draw what gentrain draws
    assert float((imgs["lora_off"] - imgs["base"]).abs().max()) <= 1e-6    # adapters off = the base
    assert diff["base"] > 1e-3 and diff["transformer_only"] > 1e-4, diff    # the adapters matter, the CLIPs' too
