"""A fine-tune on cached encodings (`gentrain data cache --pretrained`, objectives/adapters/cached.py), on the tiny
random SD3 (tiny_pipelines_sd3.py): the cache holds the pipeline VAE's posteriors and encode_prompt's outputs, the
run trains the same losses as the run on the images without loading T5, and a cache made for another pipeline (or
with text-encoder adapters asked for) is refused in one line."""
import json
import shutil

import pytest

from conftest import read_metrics, reset_accelerate_state, train_here
from tiny_pipelines_sd3 import SIZE, make_tiny_sd3_pipeline
from tiny_pipelines_sdxl import tiny_sdxl  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.finetune

RUN = [f"data.image_size={SIZE}", "data.channels=1", "data.num_workers=0", "data.random_flip=false",
       "train.mixed_precision=no", "train.batch_size=4", "train.grad_accum=1", "train.log_every=1",
       "train.progress_bar=false", "train.warmup_steps=0", "model.sample_steps=1", "model.validation_samples=4",
       "model.validation_prompts=['a 3']", "run.trackers=[]", "eval.num_samples=4", "train.ema_decay=0",
       "model.lora.rank=4", "model.text_encoder_lora.rank=0", "model.cfg_dropout=0.3", "train.lr=1e-2",
       "train.max_steps=3", "train.checkpoint_every=1000", "train.sample_every=0", "train.seed=7"]


def cache(shards, out, pipe):
    from gentrain.launch.cli import main

    reset_accelerate_state()
    assert main(["data", "cache", "--shards", str(shards), "--out", str(out), "--pretrained", str(pipe),
                 "--image-size", str(SIZE), "--channels", "1", "--batch-size", "5"]) == 0
    reset_accelerate_state()
    return json.loads((out / "index.json").read_text())["cache"]


def losses_on_images_and_cache(root, pipe, images, cached, *over):
    """The 3 training losses and the held-out validation loss after them of a run on the image shards and of one on
    their cache, same seed; and the two runs' objectives."""
    runs = []
    for name, shards in (("images", images), ("cached", cached)):
        trainer = train_here("finetune_t2i_lora", root / "runs", name, f"model.pretrained={pipe}",
                             f"data.shards={shards}", *RUN, *over)
        rows = read_metrics(root / "runs" / name)
        runs.append(([r["loss/main"] for r in rows if "loss/main" in r] +
                     [r["val/loss"] for r in rows if "val/loss" in r], trainer.objective))
    (a, image_obj), (b, cached_obj) = runs
    print(f"\nlosses on images {a}\nlosses on the cache {b}")
    assert len(a) == len(b) == 4
    # same reader order, same posterior noise, timesteps and dropout draws: only the VAE/encoders' batching differs
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert image_obj.cached is None and cached_obj.cached is not None
    return image_obj, cached_obj


@pytest.fixture(scope="module")
def cached_sd3(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("finetune_cached")
    build_source("digits", str(root / "digits"), size=SIZE, count=24, max_samples=12)
    pipe = make_tiny_sd3_pipeline(root / "sd3")
    cache(root / "digits", root / "cached", pipe)
    return root, pipe


def test_cached_run_trains_the_image_runs_losses_without_t5(cached_sd3):
    root, pipe = cached_sd3
    meta = json.loads((root / "cached" / "index.json").read_text())["cache"]
    assert meta["pipeline"] == {"pretrained": str(pipe.resolve()), "revision": None,
                                "class": "StableDiffusion3Pipeline"}
    assert meta["cond"] == ["emb", "pooled"] and meta["extras"] == [] and (root / "cached" / meta["uncond"]).is_file()

    images, cached = losses_on_images_and_cache(root, pipe, root / "digits", root / "cached")
    assert images.adapter.parts["text_encoder_3"] is not None
    assert cached.adapter.parts["text_encoder_3"] is None and cached.adapter.parts["tokenizer_3"] is None  # no T5


def test_sdxl_caches_its_time_ids_and_pooled_states(tiny_sdxl, tmp_path):
    from gentrain.data_pipeline.sources import build_source

    pipe = tiny_sdxl[1]
    build_source("digits", str(tmp_path / "digits"), size=SIZE, count=24, max_samples=12)
    meta = cache(tmp_path / "digits", tmp_path / "cached", pipe)
    assert meta["cond"] == ["emb", "pooled"] and meta["extras"] == ["time_ids"]
    from safetensors.torch import load_file
    assert all(float(v.abs().max()) > 0 for v in load_file(tmp_path / "cached" / meta["uncond"]).values())
    losses_on_images_and_cache(tmp_path, pipe, tmp_path / "digits", tmp_path / "cached")   # zeros as the dropped caption


def test_a_cache_of_another_pipeline_is_refused_in_one_line(cached_sd3, tmp_path):
    from gentrain.config import load_config
    from gentrain.errors import GentrainError
    from gentrain.objectives import build_objective

    root, pipe = cached_sd3
    other = shutil.copytree(pipe, tmp_path / "other_sd3")
    for over, match in ((f"model.pretrained={other}", "was cached with the StableDiffusion3Pipeline"),
                        (f"model.pretrained={pipe} model.text_encoder_lora.rank=2",
                         "'model.text_encoder_lora.rank': text-encoder adapters train on captions encoded live")):
        cfg = load_config("finetune_t2i_lora", [*over.split(), f"data.shards={root / 'cached'}", *RUN[:5]])
        with pytest.raises(GentrainError, match=match) as e:
            build_objective(cfg)
        assert "\n" not in str(e.value)
