"""The hub-sized SDXL, SD3.5, FLUX.1-dev and Sana presets train for real: `gentrain train PRESET` for 2 steps on a
tiny random pipeline of the same class (tiny_pipelines_sdxl.py, tiny_pipelines_sd3.py, tiny_pipelines_flux.py,
tiny_pipelines_sana.py), with the preset's own
LoRA targets, caption dropout, timestep weighting, gradient accumulation and checkpointing; only sizes,
precision and the pipeline are overridden."""
import json

import pytest

from conftest import ok, run_cli

pytestmark = [pytest.mark.finetune, pytest.mark.slow]


def tiny_pipeline(kind: str, root):
    from gentrain.data_pipeline.sources import build_source

    if kind == "sana":   # SanaPipeline draws multiples of 32 px
        from tiny_pipelines_sana import SIZE, make_tiny_sana_pipeline

        build_source("digits", str(root / "digits"), size=SIZE, count=16, max_samples=8)
        return make_tiny_sana_pipeline(root / "sana"), SIZE
    build_source("digits", str(root / "digits"), size=16, count=16, max_samples=8)
    if kind == "flux":
        from tiny_pipelines_flux import SIZE, make_tiny_flux_pipeline

        assert SIZE == 16
        return make_tiny_flux_pipeline(root / "flux"), 16
    if kind == "sd3":
        from tiny_pipelines_sd3 import SIZE, make_tiny_sd3_pipeline

        assert SIZE == 16
        return make_tiny_sd3_pipeline(root / "sd3"), 16
    from tiny_pipelines_sdxl import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(root / "sdxl"), 16


@pytest.mark.parametrize("preset, kind", [("finetune_sdxl_lora", "sdxl"), ("finetune_sdxl_full", "sdxl"),
                                          ("finetune_sd3_lora", "sd3"), ("finetune_flux_lora", "flux"),
                                          ("finetune_flux_full", "flux"), ("finetune_sana_lora", "sana")])
def test_preset_trains_two_steps_on_a_tiny_pipeline_of_its_class(preset, kind, tmp_path):
    from gentrain.config import load_config

    pipe, size = tiny_pipeline(kind, tmp_path)
    full = load_config(preset)
    assert full.model.pretrained.split("/")[0] in ("stabilityai", "black-forest-labs", "Efficient-Large-Model")
    assert full.model.gradient_checkpointing
    r = run_cli("train", preset, f"model.pretrained={pipe}", f"data.shards={tmp_path / 'digits'}",
                f"data.image_size={size}", "data.channels=1", "data.num_workers=0", "train.mixed_precision=no",
                "model.sample_steps=2", "model.validation_samples=4", "model.validation_prompts=['a 3']",
                "run.trackers=[]", "eval.num_samples=4", "train.max_steps=2", "train.log_every=1",
                "train.sample_every=2", "train.checkpoint_every=2", "train.progress_bar=false",
                f"run.output_dir={tmp_path / 'runs'}", "run.name=s", timeout=900)
    ok(r)
    run = tmp_path / "runs" / "s"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/main"] for row in rows if "loss/main" in row]
    assert len(losses) == 2 and all(x == x for x in losses)          # two finite steps
    assert (run / "checkpoints" / "step_2" / "manifest.json").is_file() and (run / "samples" / "step_2.png").is_file()
