"""A fine-tune on cached encodings (`gentrain data cache --pretrained`, objectives/adapters/cached.py), on the tiny
random SD3 (tiny_pipelines_sd3.py): the cache holds the pipeline VAE's posteriors and encode_prompt's outputs, the
run trains the same losses as the run on the images without loading T5, and a cache made for another pipeline (or
with text-encoder adapters asked for) is refused in one line."""
import json
import shutil

import pytest

from conftest import read_metrics, reset_accelerate_state, train_here
from tiny_pipelines_sd3 import SIZE, make_tiny_sd3_pipeline

pytestmark = pytest.mark.finetune

RUN = [f"data.image_size={SIZE}", "data.channels=1", "data.num_workers=0", "data.random_flip=false",
       "train.mixed_precision=no", "train.batch_size=4", "train.grad_accum=1", "train.log_every=1",
       "train.progress_bar=false", "train.warmup_steps=0", "model.sample_steps=2", "model.validation_samples=4",
       "model.validation_prompts=['a 3']", "run.trackers=[]", "eval.num_samples=4", "train.ema_decay=0",
       "model.lora.rank=4", "model.text_encoder_lora.rank=0", "model.cfg_dropout=0.3", "train.lr=1e-2",
       "train.max_steps=3", "train.checkpoint_every=1000", "train.sample_every=1000", "train.seed=7"]


@pytest.fixture(scope="module")
def cached_sd3(tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source
    from gentrain.launch.cli import main

    root = tmp_path_factory.mktemp("finetune_cached")
    build_source("digits", str(root / "digits"), size=SIZE, count=24, max_samples=12)
    pipe = make_tiny_sd3_pipeline(root / "sd3")
    reset_accelerate_state()
    assert main(["data", "cache", "--shards", str(root / "digits"), "--out", str(root / "cached"), "--pretrained",
                 str(pipe), "--image-size", str(SIZE), "--channels", "1", "--batch-size", "5"]) == 0
    reset_accelerate_state()
    return root, pipe


def test_cached_run_trains_the_image_runs_losses_without_t5(cached_sd3):
    root, pipe = cached_sd3
    meta = json.loads((root / "cached" / "index.json").read_text())["cache"]
    assert meta["pipeline"] == {"pretrained": str(pipe.resolve()), "revision": None,
                                "class": "StableDiffusion3Pipeline"}
    assert meta["cond"] == ["emb", "pooled"] and meta["extras"] == [] and (root / "cached" / meta["uncond"]).is_file()

    images = train_here("finetune_t2i_lora", root / "runs", "images", f"model.pretrained={pipe}",
                        f"data.shards={root / 'digits'}", *RUN)
    cached = train_here("finetune_t2i_lora", root / "runs", "cached", f"model.pretrained={pipe}",
                        f"data.shards={root / 'cached'}", *RUN)
    assert images.objective.adapter.parts["text_encoder_3"] is not None
    assert cached.objective.adapter.parts["text_encoder_3"] is None          # T5 never loaded
    assert cached.objective.adapter.parts["tokenizer_3"] is None
    assert cached.objective.cached is not None and images.objective.cached is None

    def losses(name):   # the held-out validation loss at step 0, then the 3 training steps'
        rows = read_metrics(root / "runs" / name)
        return [r["val/loss"] for r in rows if r["step"] == 0 and "val/loss" in r] + \
            [r["loss/main"] for r in rows if "loss/main" in r]
    a, b = losses("images"), losses("cached")
    print(f"\nlosses on images {a}\nlosses on the cache {b}")
    assert len(a) == len(b) == 4
    # same reader order, same posterior noise, timesteps and dropout draws: only the VAE/encoders' batching differs
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


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
