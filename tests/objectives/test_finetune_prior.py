"""DreamBooth-style prior preservation (model.prior, gentrain/objectives/prior.py) through the pipeline adapter,
on the tiny SDXL pipeline: the class images are drawn once by the base pipeline (stock
StableDiffusionXLPipeline's drawing, bit for bit up to PNG rounding) and reused; each batch gets as many class
samples, captioned with the class prompt and with their own add_time_ids; the loss is instance mean +
prior_loss_weight * class mean; the validation loss stays the instance data's; bad keys are one-line errors;
model.cfg_dropout drops both halves' captions. The trait figures (drift of prompts without the token, with and
without preservation) need a trained base: tests/objectives/test_t2i_quality.py."""
import json

import pytest
import torch

from conftest import ok, read_metrics, run_cli
from tiny_pipelines_sdxl import tiny_sdxl  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.finetune

CLASS = "a digit"
COMMON = ["data.image_size=16", "data.channels=1", "data.num_workers=0", "data.random_flip=false",
          "train.mixed_precision=no", "train.batch_size=4", "model.sample_steps=2", "model.validation_samples=4",
          "model.gradient_checkpointing=false", "run.trackers=[]", "eval.num_samples=4", "model.cfg_dropout=0",
          "model.lora.rank=2", "model.text_encoder_lora.rank=0"]
PRIOR = [f"model.prior.class_prompt='{CLASS}'", "model.prior.num_class_images=6", "model.prior.sample_batch_size=4"]


def build(tiny, tmp, name, *over):
    from gentrain.config import load_config
    from gentrain.objectives import build_objective

    root, pipe = tiny
    cfg = load_config("finetune_t2i_lora", [f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON,
                                            f"run.output_dir={tmp}", f"run.name={name}", *over])
    return cfg, build_objective(cfg)


def test_class_images_drawn_once_by_the_base_join_each_batch_with_their_own_loss_weight(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from gentrain.eval.heldout import heldout_batches
    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives.base import Runtime

    cfg, obj = build(tiny_sdxl, tmp_path, "run", *PRIOR)
    folder = tmp_path / "run" / "class_images"
    index = json.loads((folder / "index.json").read_text())
    assert index["samples"] == 6 and "drawn by" in index["source"], index
    # drawn by the base: stock diffusers, the run's seed, sample_steps, the pipeline's own guidance (5.0)
    stock = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl[1]))
    stock.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(cfg.train.seed)
    want = torch.cat([stock(prompt=[CLASS] * n, height=16, width=16, num_inference_steps=2, output_type="pt",
                            generator=g).images for n in (4, 2)])
    want = (want * 255).round() / 127.5 - 1
    assert obj.prior_images is None   # read at the first batch
    got = obj.class_images()["image"]
    assert got.shape == (6, 1, 16, 16) and obj.prior_images["size_crop"].tolist() == [[16, 16, 0, 0]] * 6
    dist = (got[:, None] - want[None]).abs().flatten(2).amax(2)    # each read image against each drawn one
    assert sorted(dist.argmin(1).tolist()) == list(range(6)) and float(dist.min(1).values.max()) < 1e-5, dist
    # reused: a resumed (rebuilt) run draws nothing
    stamp = (folder / "index.json").stat().st_mtime_ns
    build(tiny_sdxl, tmp_path, "run", *PRIOR)
    assert (folder / "index.json").stat().st_mtime_ns == stamp

    batch = next(heldout_batches(cfg, batch_size=4))
    obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(5))))
    with torch.no_grad():
        x0, cond = obj.inputs(batch)
        assert x0.shape[0] == 8 and obj.sample_weights.tolist() == [2.0] * 8
        emb = obj.encode([CLASS] * 4)["emb"]
        assert torch.equal(cond["emb"][4:], emb) and not torch.equal(cond["emb"][:4], emb)   # class half: class prompt
        assert cond["time_ids"][4:].tolist() == [[16, 16, 0, 0, 16, 16]] * 4
        figures = {}
        for w in (1.0, 0.25):
            cfg.model.prior.prior_loss_weight = w
            obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(5))))
            total, logs = obj.loss("main", batch)
            figures[w] = (float(total), float(logs["prior/instance_loss"]), float(logs["prior/class_loss"]))
    for w, (total, inst, cls) in figures.items():   # the same draws: the halves' means agree, the total follows w
        assert inst > 0 and cls > 0 and abs(total - (inst + w * cls)) < 1e-5 * total, figures
    assert figures[1.0][1:] == figures[0.25][1:], figures

    # the held-out validation loss is the instance data's alone: the same as a run without preservation
    _, plain = build(tiny_sdxl, tmp_path, "plain")
    for o in (obj, plain):
        o.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(0))))
    assert obj.validation() == plain.validation()
    assert not (tmp_path / "plain" / "class_images").exists()

    # model.cfg_dropout is caption dropout: at 1 - 1e-6 every caption of the batch, the class half's included,
    # conditions on what the pipeline guides against (SDXL: zeros, force_zeros_for_empty_prompt); the
    # add_time_ids are never dropped
    obj.cfg_dropout = 1 - 1e-6
    obj.bind(Runtime(rng=BatchRNG(generator=torch.Generator().manual_seed(1))))
    with torch.no_grad():
        _, cond = obj.inputs(batch)
    assert cond["emb"].shape[0] == 8 and not cond["emb"].any() and not cond["pooled"].any()
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 8


def test_a_prior_run_trains_through_the_cli_and_resumes_bitwise(tiny_sdxl, tmp_path):
    """Through `gentrain train`: the class images drawn once into the run's class_images/, both halves' losses
    logged, and a run stopped at step 1 and resumed equal to one straight through (class picks and all)."""
    root, pipe = tiny_sdxl
    args = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON,
            *PRIOR, "train.max_steps=2", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=1",
            "train.progress_bar=false", "train.ema_decay=0", "train.lr=1e-2", f"run.output_dir={tmp_path}"]
    ok(run_cli(*args, "run.name=straight"))
    assert run_cli(*args, "run.name=split", "--stop-at", "1").returncode == 0
    stamp = (tmp_path / "split" / "class_images" / "index.json").stat().st_mtime_ns
    ok(run_cli(*args, "run.name=split", "--resume", "auto"))
    assert (tmp_path / "split" / "class_images" / "index.json").stat().st_mtime_ns == stamp   # not drawn again
    keys = ("loss/main", "prior/instance_loss", "prior/class_loss")
    rows = {name: {r["step"]: tuple(r[k] for k in keys) for r in read_metrics(tmp_path / name) if "loss/main" in r}
            for name in ("straight", "split")}
    assert sorted(rows["straight"]) == [1, 2] and rows["split"][2] == rows["straight"][2], rows
    for f in sorted((tmp_path / "straight" / "checkpoints" / "step_2").glob("model*.safetensors")):
        assert f.read_bytes() == (tmp_path / "split" / "checkpoints" / "step_2" / f.name).read_bytes(), f.name


def test_bad_prior_settings_are_one_line_errors(tiny_sdxl, tmp_path):
    from gentrain.config import load_config
    from gentrain.errors import GentrainError

    root, pipe = tiny_sdxl
    images = tmp_path / "photos"
    images.mkdir()
    (images / "a.png").write_bytes(b"not read")
    r = run_cli("train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON,
                *PRIOR, f"model.prior.class_data_dir={images}", f"run.output_dir={tmp_path / 'runs'}", "run.name=x")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "'model.prior.class_data_dir'" in lines[0] and "gentrain data build --source folder:" in lines[0], lines
    assert not (tmp_path / "runs" / "x").exists()
    base = [f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON]
    for over, key in (([f"model.prior.class_data_dir={tmp_path}"], "'model.prior.class_data_dir'"),
                      ([*PRIOR, "model.prior.prior_loss_weight=0"], "'model.prior'"),
                      ([*PRIOR, "data.aspect_buckets=true"], "'model.prior.class_prompt'")):
        with pytest.raises(GentrainError, match=key):
            load_config("finetune_t2i_lora", [*base, *over])

