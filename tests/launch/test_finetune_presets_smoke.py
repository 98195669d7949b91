"""The hub-sized SD3.5 preset trains for real: `gentrain train finetune_sd3_lora` for 2 steps on a tiny
random StableDiffusion3Pipeline of the same class (tiny_pipelines_sd3.py), with the preset's own LoRA
targets (joint attention, both streams), timestep weighting and gradient accumulation; only sizes,
precision and the pipeline are overridden. (The SDXL presets wait for the SDXL adapter.)"""
import json

import pytest

from conftest import ok, run_cli

pytestmark = [pytest.mark.finetune, pytest.mark.slow]


def test_finetune_sd3_lora_trains_two_steps_on_a_tiny_sd3(tmp_path):
    from gentrain.config import load_config
    from gentrain.data_pipeline.sources import build_source
    from tiny_pipelines_sd3 import SIZE, make_tiny_sd3_pipeline

    build_source("digits", str(tmp_path / "digits"), size=SIZE, count=16, max_samples=8)
    pipe = make_tiny_sd3_pipeline(tmp_path / "sd3")
    preset = load_config("finetune_sd3_lora")
    assert preset.model.weighting_scheme == "logit_normal" and preset.train.grad_accum == 4
    r = run_cli("train", "finetune_sd3_lora", f"model.pretrained={pipe}", f"data.shards={tmp_path / 'digits'}",
                f"data.image_size={SIZE}", "data.channels=1", "data.num_workers=0", "train.mixed_precision=no",
                "model.sample_steps=2", "model.validation_samples=4", "model.validation_prompts=['a 3']",
                "run.trackers=[]", "eval.num_samples=4", "train.max_steps=2", "train.log_every=1",
                "train.sample_every=2", "train.checkpoint_every=2", "train.progress_bar=false",
                f"run.output_dir={tmp_path / 'runs'}", "run.name=s", timeout=900)
    ok(r)
    run = tmp_path / "runs" / "s"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/main"] for row in rows if "loss/main" in row]
    assert len(losses) == 2 and all(x == x for x in losses)          # two finite steps
    manifest = json.loads((run / "checkpoints" / "step_2" / "manifest.json").read_text())
    assert manifest and (run / "samples" / "step_2.png").is_file()
