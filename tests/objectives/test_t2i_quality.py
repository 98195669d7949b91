"""Scaled-down quality, one short run per conditional objective on 16-px digits: a 400-step
autoencoder, then 400 steps each of latent flow (text), latent diffusion (text) and DiT diffusion
(class labels) on its cached latents, caption embeddings and labels (`gentrain data cache`, the
demo's route: ~3x cheaper steps, the same losses as on the image shards). The digits classifier must read the asked-for digit in most samples; the same
networks untrained read ~10%. Then a LoRA fine-tune of the trained flow model's export teaches a new
token a measured trait (upside-down digits) and leaves prompts without it where they were."""
import json

import pytest
import torch

from conftest import ok, run_cli

STEPS = ["train.max_steps=400", "train.sample_every=0", "train.checkpoint_every=400", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def latent_digits(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("t2i_quality")
    build_source("digits", str(root / "train"), size=16, split="train")
    r = run_cli("train", "vae_digits", f"data.shards={root / 'train'}", *STEPS, "eval.digits=false",
                "eval.num_samples=64", "eval.shards=null", f"run.output_dir={root}", "run.name=ae", timeout=900)
    ok(r)
    assert run_cli("export", str(root / "ae"), "--out", str(root / "vae"), timeout=300).returncode == 0
    r = run_cli("data", "cache", "--shards", str(root / "train"), "--out", str(root / "cached"), "--autoencoder",
                str(root / "vae"), "--image-size", "16", "--channels", "1", "--max-length", "16", timeout=600)
    ok(r)
    return root


_TRAINED: dict = {}


def train_preset(root, preset: str) -> dict:
    """Train `preset` once per session on the shared autoencoder; its eval.json figures."""
    if preset not in _TRAINED:
        small = [] if preset.startswith("dit") else ["model.block_out_channels=[32,64]"]   # scaled down: 4x cheaper
        r = run_cli("train", preset, f"data.shards={root / 'cached'}", f"model.latent.autoencoder={root / 'vae'}", *STEPS,
                    *small, "eval.digits=true", "eval.num_samples=200", "eval.fd_seeds=1", f"run.output_dir={root}",
                    f"run.name={preset}", timeout=900)
        ok(r)
        _TRAINED[preset] = json.loads(r.stdout)
    return _TRAINED[preset]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["t2i_flow_digits", "t2i_ddpm_digits", "dit_class_digits"])
def test_short_run_follows_its_conditioning_and_untrained_fails(preset, latent_digits):
    from gentrain.config import load_config
    from gentrain.eval.metrics import evaluate
    from gentrain.objectives import build_objective

    root = latent_digits
    res = train_preset(root, preset)
    keys = ["eval/accuracy"] if preset.startswith("dit") else ["eval/accuracy_numeral", "eval/accuracy_word"]
    assert all(res[k] >= 0.8 for k in keys), res
    cfg = load_config(str(root / preset / "config.yaml"), ["eval.num_samples=100"])   # ~10% expected: 100 tell
    torch.manual_seed(0)
    untrained = build_objective(cfg)
    next(iter(untrained.nets.values())).eval()
    bad = evaluate(untrained, cfg)
    assert all(bad[k] < 0.5 for k in keys), bad


TOKEN = "zxq"
FT = ["data.image_size=16", "data.channels=1", "data.num_workers=0", "data.random_flip=false",
      "train.mixed_precision=no", "train.batch_size=64", "train.sample_every=0", "train.progress_bar=false",
      "train.lr_schedule=constant", "train.warmup_steps=0", "run.trackers=[]", "model.gradient_checkpointing=false",
      "model.time_sampling=logit_normal", "model.guidance_scale=3", "model.sample_steps=20",
      "model.validation_samples=64", "eval.num_samples=64"]


def upside_down_shards(root):
    """The training digits, every other one turned 180 degrees with the new token in its caption
    (the others as they were: prompts without the token keep their meaning), as an image folder
    with captions.jsonl built into shards, the user's route. (Inverted colours were the first
    choice: this 400-step autoencoder cannot represent a white background, MSE 0.98 against
    0.008; a 180-degree turn stays in its range, 0.029.)"""
    from gentrain.data_pipeline.sources import _digit_images, build_source

    folder, rows = root / "upside_down", []
    folder.mkdir()
    for k, (_, _, img, caption) in enumerate(_digit_images(16, 0, None, "train")):
        if k % 2 == 0:
            img, caption = img.rotate(180), f"{caption} {TOKEN}"
        img.save(folder / f"{k:05d}.png")
        rows.append(json.dumps({"file": f"{k:05d}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(rows))
    build_source(f"folder:{folder}", str(root / "upside_down_shards"))
    return root / "upside_down_shards"


@pytest.mark.slow
@pytest.mark.finetune
def test_lora_finetune_teaches_a_token_its_trait_and_leaves_other_prompts(latent_digits):
    """Trait score = digits accuracy of the samples turned back 180 degrees minus their accuracy as
    drawn (about -0.5 for upright digits: 0, 1, 8 read either way; positive once upside down).
    Measured (200 LoRA steps, rank 8, lr 3e-3): token prompts -0.51 -> +0.45 (a shift of 0.96),
    prompts without the token -0.53 -> -0.51 (0.02), their accuracy 0.99 -> 1.00."""
    import torch

    from gentrain.eval.digits import evaluate_images
    from gentrain.eval.metrics import digit_prompts
    from gentrain.objectives.finetune import set_adapters
    from gentrain.train.runs import load_trained

    root = latent_digits
    train_preset(root, "t2i_flow_digits")
    assert run_cli("export", str(root / "t2i_flow_digits"), "--out", str(root / "base"), timeout=300).returncode == 0
    shards = upside_down_shards(root)
    r = run_cli("train", "finetune_t2i_lora", f"model.pretrained={root / 'base'}", f"data.shards={shards}", *FT,
                "train.max_steps=200", "train.lr=3e-3", "train.checkpoint_every=200", "model.lora.rank=8",
                "model.lora.alpha=8", f"run.output_dir={root}", "run.name=lora", timeout=900)
    ok(r)
    _, objective, _ = load_trained(root / "lora")
    plain = digit_prompts("numeral", 100)
    labels = torch.tensor([i % 10 for i in range(100)])

    def score(prompts):
        x = objective.sample(100, {"prompts": prompts}, generator=torch.Generator().manual_seed(0), steps=20,
                             guidance_scale=3.0)
        drawn = evaluate_images(x, labels=labels, seed=0)["accuracy"]
        turned = evaluate_images(torch.flip(x, [2, 3]), labels=labels, seed=0)["accuracy"]
        return turned - drawn, drawn

    res = {}
    for on in (False, True):
        set_adapters(objective.nets["unet"], on)
        for name, prompts in (("plain", plain), ("token", [f"{p} {TOKEN}" for p in plain])):
            res[("lora" if on else "base", name)] = score(prompts)
    shift = {name: res[("lora", name)][0] - res[("base", name)][0] for name in ("plain", "token")}
    print(f"\ntrait score (accuracy turned back - as drawn) base -> LoRA: {res}; shift {shift}")
    assert shift["token"] >= 0.6, res
    assert abs(shift["plain"]) <= 0.15 and res[("lora", "plain")][1] >= 0.9, res


@pytest.mark.slow
@pytest.mark.finetune
def test_full_finetune_of_a_flow_export_trains(latent_digits):
    """The flow export (DPMSolver flow scheduler) fine-tuned in full: the validation loss on fixed
    (t, noise) pairs of the new data falls."""
    from conftest import read_metrics

    root = latent_digits
    if not (root / "base").exists():
        train_preset(root, "t2i_flow_digits")
        assert run_cli("export", str(root / "t2i_flow_digits"), "--out", str(root / "base"), timeout=300).returncode == 0
    shards = root / "upside_down_shards"
    if not shards.exists():
        shards = upside_down_shards(root)
    r = run_cli("train", "finetune_t2i", f"model.pretrained={root / 'base'}", f"data.shards={shards}", *FT,
                "train.max_steps=20", "train.lr=3e-4", "train.grad_accum=1", "train.ema_decay=0", "train.sample_every=20",
                "train.checkpoint_every=20", "model.validation_prompts=['a handwritten digit 3 zxq']",
                f"run.output_dir={root}", "run.name=full", timeout=900)
    ok(r)
    assert json.loads(r.stdout)["eval/val_loss"] > 0
    val = {m["step"]: m["val/loss"] for m in read_metrics(root / "full") if "val/loss" in m}
    assert sorted(val) == [0, 20] and val[20] < val[0], val
