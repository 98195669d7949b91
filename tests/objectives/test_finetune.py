"""Fine-tuning a diffusers StableDiffusionPipeline (family `finetune`) on a tiny pipeline built here:
LoRA on the UNet and the text encoder with lora_alpha != rank, adapters-only checkpoints, a bitwise
resume, exports that stock diffusers loads in a fresh process (diffusers format, kohya, fused) and
that draw what gentrain drew; a full fine-tune of a v-prediction pipeline; errors before step 1.
The trait-shift figure on a trained base is in test_t2i_quality.py."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import cli_env, make_tiny_sd_pipeline, ok, read_metrics, run_cli

pytestmark = pytest.mark.finetune

COMMON = ["data.image_size=16", "data.channels=1", "data.num_workers=0", "data.random_flip=false",
          "train.mixed_precision=no", "train.batch_size=8", "train.grad_accum=1", "train.log_every=1",
          "train.progress_bar=false", "train.warmup_steps=0", "model.sample_steps=3", "model.validation_samples=16",
          "model.gradient_checkpointing=false", "model.validation_prompts=['a 3', 'a 7']", "run.trackers=[]",
          "eval.num_samples=16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("finetune")
    build_source("digits", str(root / "digits"), size=16, count=96, max_samples=48)
    return root, make_tiny_sd_pipeline(root / "vpred", "v_prediction")


def losses(run_dir):
    return {r["step"]: r["loss/main"] for r in read_metrics(run_dir) if "loss/main" in r}


LORA = ["model.lora.rank=4", "model.lora.alpha=2", "train.lr=1e-2", "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=3", "train.ema_decay=0"]

FRESH_HEAD = """
import json, sys, torch
from diffusers import StableDiffusionPipeline
base, out, prompts = sys.argv[1], sys.argv[2], ["a 3", "a 7"]
def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, height=16, width=16, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
def with_lora(weight_name=None):
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(out, **({"weight_name": weight_name} if weight_name else {}))
    return pipe
"""
FRESH_TAIL = """
torch.save(imgs, out + "/fresh.pt")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gentrain"))))
"""
FRESH = FRESH_HEAD + """
imgs = {"base": draw(StableDiffusionPipeline.from_pretrained(base, safety_checker=None)), "lora": draw(with_lora()),
        "kohya": draw(with_lora("pytorch_lora_weights_kohya.safetensors")),
        "fused": draw(StableDiffusionPipeline.from_pretrained(out + "/fused", safety_checker=None))}
pipe = with_lora()
pipe.disable_lora()
imgs["lora_off"] = draw(pipe)
""" + FRESH_TAIL
FRESH_TE = FRESH_HEAD + """
unet_only = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
unet_only.unet.load_lora_adapter(out, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
imgs = {"unet_only": draw(unet_only), "lora": draw(with_lora()),
        "kohya": draw(with_lora("pytorch_lora_weights_kohya.safetensors"))}
""" + FRESH_TAIL


def stock_vs_gentrain(script, pipe, out, objective):
    """What `script` draws per load path with stock diffusers in a fresh process that never imports
    gentrain (base pipeline `pipe`, export `out`), and each one's max |diff| from gentrain's drawing."""
    mine = (objective.sample(2, {"prompts": ["a 3", "a 7"]}, generator=torch.Generator().manual_seed(0), steps=3,
                             guidance_scale=3.0) + 1) / 2
    assert mine.shape == (2, 1, 16, 16) and torch.isfinite(mine).all()
    r = subprocess.run([sys.executable, "-c", script, str(pipe), str(out)], capture_output=True, text=True,
                       timeout=300, env=cli_env())
    ok(r)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    imgs = torch.load(out / "fresh.pt", weights_only=True)
    return imgs, {k: float((v - mine).abs().max()) for k, v in imgs.items()}


def test_lora_checkpoints_resume_and_exports_load_in_stock_diffusers(tiny, tmp_path):
    root, pipe = tiny
    args = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON, *LORA,
            "model.export_fused=true", f"run.output_dir={tmp_path}"]
    r = run_cli(*args, "run.name=straight")
    ok(r)
    run = tmp_path / "straight"
    # adapters only: every tensor in the checkpoint is a LoRA weight
    ck = run / "checkpoints" / "step_6"
    with safe_open(str(ck / "model.safetensors"), "pt") as h:
        keys = list(h.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:5]
    assert (ck / "model.safetensors").stat().st_size < 100_000
    # validation: the grid (base row + current row) before training and on cadence, the loss on fixed pairs
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0.png", "step_3.png", "step_6.png"]
    val = {r["step"]: r["val/loss"] for r in read_metrics(run) if "val/loss" in r}
    assert sorted(val) == [0, 3, 6] and val[6] < val[0], val

    # stop at 2, resume: the same losses bit for bit and the same adapter files (the resumed run reads its held-out
    # samples at step 3, the straight one at step 0: that read must not move the training draws)
    assert run_cli(*args, "run.name=split", "--stop-at", "2").returncode == 0
    r = run_cli(*args, "run.name=split", "--resume", "auto")
    ok(r)
    a, b = losses(run), losses(tmp_path / "split")
    assert all(a[s] == b[s] for s in (3, 4, 5, 6)), (a, b)
    assert (ck / "model.safetensors").read_bytes() == \
        (tmp_path / "split" / "checkpoints" / "step_6" / "model.safetensors").read_bytes()

    out = tmp_path / "export"
    r = run_cli("export", str(run), "--out", str(out))
    ok(r)
    info = json.loads((out / "gentrain_export.json").read_text())
    assert info["kind"] == "lora" and info["kohya_file"] and info["fused"] == "fused", info
    # lora_alpha survives in both files (diffusers #6087): the peft config in the header, kohya's alpha tensors
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        meta = json.loads(h.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 2 and meta["unet.r"] == 4, meta
    with safe_open(str(out / "pytorch_lora_weights_kohya.safetensors"), "pt") as h:
        alphas = {float(h.get_tensor(k)) for k in h.keys() if k.endswith(".alpha")}
    assert alphas == {2.0}, alphas

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(run)
    imgs, diff = stock_vs_gentrain(FRESH, pipe, out, objective)   # stock diffusers in a fresh process vs gentrain
    print("\nmax |stock - gentrain| per load path:", diff)
    assert diff["lora"] <= 1e-5 and diff["kohya"] <= 1e-5 and diff["fused"] <= 1e-4, diff
    assert float((imgs["lora_off"] - imgs["base"]).abs().max()) <= 1e-6        # adapters off = the base model
    assert diff["base"] > 0.05, diff                                           # and the adapters matter


def test_full_finetune_of_a_v_prediction_pipeline(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    root, pipe = tiny
    r = run_cli("train", "finetune_t2i", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON,
                "train.lr=1e-3", "train.max_steps=8", "train.sample_every=8", "train.checkpoint_every=8",
                "train.ema_decay=0.5", "model.min_snr_gamma=5", "model.optimizer=adamw8bit", f"run.output_dir={tmp_path}",
                "run.name=full")
    ok(r)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:   # not on this machine: one line says so, and torch AdamW trains
        assert r.stderr.count("optimizer adamw8bit needs bitsandbytes") == 1, r.stderr[-2000:]
    val = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path / "full") if "val/loss" in r}
    assert sorted(val) == [0, 8] and val[8] < val[0], val
    assert run_cli("export", str(tmp_path / "full"), "--out", str(tmp_path / "export")).returncode == 0
    tuned = StableDiffusionPipeline.from_pretrained(str(tmp_path / "export"), safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(str(pipe), safety_checker=None)
    assert tuned.scheduler.config.prediction_type == "v_prediction"
    moved = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(tuned.unet.parameters(), base.unet.parameters()))
    assert moved > 1e-4, moved
    # the export holds the EMA weights the run kept
    from safetensors.torch import load_file

    ema = load_file(str(tmp_path / "full" / "checkpoints" / "step_8" / "ema_unet.safetensors"))
    k = "model.conv_in.weight"
    assert torch.equal(tuned.unet.state_dict()["conv_in.weight"], ema[k])


def build(tmp, pipe, shards, *overrides):
    from gentrain.config import load_config
    from gentrain.objectives import build_objective

    cfg = load_config("finetune_t2i_lora", [f"model.pretrained={pipe}", f"data.shards={shards}", "data.image_size=16",
                                            "data.channels=1", "data.num_workers=0", *overrides])
    return build_objective(cfg)


def test_bad_setups_fail_before_training_with_one_line(tiny, tmp_path):
    from gentrain.errors import GentrainError

    root, pipe = tiny
    shards = root / "digits"
    with pytest.raises(GentrainError, match="'model.pretrained'.*not a folder"):
        build(tmp_path, tmp_path / "missing", shards)
    with pytest.raises(GentrainError, match=r"'model.lora.targets'.*match no module.*to_q"):
        build(tmp_path, pipe, shards, "model.lora.targets=[nope]")
    with pytest.raises(GentrainError, match=r"'model.text_encoder_lora.targets'.*q_proj"):
        build(tmp_path, pipe, shards, "model.text_encoder_lora.rank=2", "model.text_encoder_lora.targets=[query]")
    with pytest.raises(GentrainError, match="'data.channels'"):
        build(tmp_path, pipe, shards, "data.channels=3")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                 scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "ddpm"))
    with pytest.raises(GentrainError, match="is a DDPMPipeline; fine-tuning takes a StableDiffusionPipeline"):
        build(tmp_path, tmp_path / "ddpm", shards)
    with pytest.raises(GentrainError, match="'model.prediction_type'"):
        build(tmp_path, pipe, shards, "model.prediction_type=sample")
    dora = build(tmp_path, pipe, shards, "model.lora.use_dora=true")
    assert "DoRA" in dora.kohya_problem()
    assert any("lora_magnitude_vector" in k for k, p in dora.nets["unet"].named_parameters() if p.requires_grad)


def test_text_encoder_adapters_train_and_export(tiny, tmp_path, fresh_accelerate_state):
    """LoRA on the CLIP text encoder too (q/k/v/out_proj), in process, under bf16: the frozen base
    is held in bf16, the adapters train in fp32. The export keeps alpha in both formats, and stock
    `load_lora_weights` in a fresh process draws what gentrain draws (in fp32), while the UNet's
    adapters alone do not."""
    from gentrain.config import load_config
    from gentrain.train.export import export_run
    from gentrain.train.loop import Trainer
    from gentrain.train.runs import load_trained

    root, pipe = tiny
    over = [o for o in COMMON if "validation_prompts" not in o and "mixed_precision" not in o] + [
        "train.mixed_precision=bf16", "model.validation_prompts=['a 3']",
        f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *LORA, "model.text_encoder_lora.rank=2",
        "model.text_encoder_lora.alpha=8", "train.max_steps=3", "train.sample_every=3", "model.export_fused=true",
        f"run.output_dir={tmp_path}", "run.name=te"]
    cfg = load_config("finetune_t2i_lora", over)
    trainer = Trainer(cfg, tmp_path / "te")
    trained = {k: p.detach().clone() for k, p in trainer.objective.nets["text_encoder"].named_parameters() if p.requires_grad}
    assert trained and all("lora_" in k for k in trained)
    for name in ("unet", "text_encoder"):
        params = list(trainer.raw_nets[name].named_parameters())
        assert {p.dtype for _, p in params if p.requires_grad} == {torch.float32}
        assert {p.dtype for _, p in params if not p.requires_grad} == {torch.bfloat16}
    trainer.train()
    moved = max(float((p.detach() - trained[k]).abs().max())
                for k, p in trainer.raw_nets["text_encoder"].named_parameters() if k in trained)
    assert moved > 0, "the text-encoder adapters did not train"
    out = export_run(tmp_path / "te", tmp_path / "export")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        keys, meta = list(h.keys()), json.loads(h.metadata()["lora_adapter_metadata"])
    assert any(k.startswith("text_encoder.") and "q_proj" in k for k in keys) and meta["text_encoder.lora_alpha"] == 8
    with safe_open(str(out / "pytorch_lora_weights_kohya.safetensors"), "pt") as h:
        te_alpha = {float(h.get_tensor(k)) for k in h.keys() if k.startswith("lora_te1_") and k.endswith(".alpha")}
    assert te_alpha == {8.0}, te_alpha
    cfg_file = tmp_path / "te" / "config.yaml"   # gentrain draws in fp32 here, as the fresh process does
    cfg_file.write_text(cfg_file.read_text().replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    _, objective, _ = load_trained(tmp_path / "te")
    # stock diffusers in a fresh process without gentrain: load_lora_weights puts both adapters in place
    _, diff = stock_vs_gentrain(FRESH_TE, pipe, out, objective)
    print("\nmax |stock - gentrain| with the text-encoder adapters, and without them:", diff)
    assert diff["lora"] <= 1e-5 and diff["kohya"] <= 1e-5 and diff["unet_only"] > 1e-3, diff   # the encoder's adapters matter and load


def test_mixed_sizes_train_in_aspect_buckets_and_a_small_bucket_is_reported(tiny, tmp_path, capsys, fresh_accelerate_state):
    """Digits at three aspect ratios: square, tall (1:2) and a few wide (2:1). Every bucket trains at
    its own latent shape; the wide bucket, smaller than one global batch, is named with its count
    at start and its waiting samples are counted in the metrics, never dropped."""
    from PIL import Image

    from gentrain.data_pipeline.sources import _digit_images, build_source
    from gentrain.config import load_config
    from gentrain.train.loop import Trainer

    root, pipe = tiny
    folder, rows = tmp_path / "mixed", []
    folder.mkdir()
    for k, (_, _, img, caption) in enumerate(_digit_images(16, 0, 85, "train")):
        size = (16, 16) if k < 40 else (16, 32) if k < 80 else (32, 16)   # (W, H)
        img.resize(size, Image.BICUBIC).save(folder / f"{k:03d}.png")
        rows.append(json.dumps({"file": f"{k:03d}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(rows))
    build_source(f"folder:{folder}", str(tmp_path / "shards"))
    over = [o for o in COMMON if "validation_prompts" not in o] + [
        f"model.pretrained={pipe}", f"data.shards={tmp_path / 'shards'}", "data.aspect_buckets=true",
        "data.random_crop=false", *LORA, "train.max_steps=12", "train.sample_every=0", "train.checkpoint_every=0",
        f"run.output_dir={tmp_path}", "run.name=mixed"]
    shapes = []
    trainer = Trainer(load_config("finetune_t2i_lora", over), tmp_path / "mixed")
    err = capsys.readouterr().err
    assert "aspect bucket 24x12 holds 5 sample(s), fewer than one global batch (8)" in err, err[-2000:]
    real_loss = trainer.objective.loss

    def spy(phase, batch):
        shapes.append(tuple(batch["image"].shape[-2:]))
        return real_loss(phase, batch)

    trainer.objective.loss = spy
    trainer.train()
    assert {(16, 16), (24, 12)} <= set(shapes), shapes          # (H, W): square and tall buckets trained
    waiting = [r["data/bucket_waiting"] for r in read_metrics(tmp_path / "mixed") if "data/bucket_waiting" in r]
    assert waiting and max(waiting) >= 5, waiting   # the wide ones wait (and the partial tall/square batches)
