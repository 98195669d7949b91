"""LoRA on a tiny FLUX.1-dev-shaped pipeline (tiny_pipelines_flux.py) under DeepSpeed ZeRO-3 on 2 CPU processes (the
frozen transformer base inside the engine with its adapters; fp32 here, as CPU gloo runs): the adapters and their EMA end within 1e-5 of the same run
under DDP on 2 processes, and the run exports FluxPipeline's LoRA files."""
import pytest
from safetensors.torch import load_file

from conftest import ok, run_cli
from test_deepspeed import ddp, final, launch, max_diff
from tiny_pipelines_flux import SIZE, shared_flux_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.deepspeed, pytest.mark.finetune]


def test_flux_lora_under_zero3_matches_ddp(tmp_path, tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    pipe = shared_flux_pipeline(tmp_path_factory)
    build_source("digits", str(tmp_path / "digits"), size=SIZE, count=32, max_samples=16)
    common = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={tmp_path / 'digits'}",
              f"data.image_size={SIZE}", "data.channels=1", "data.random_flip=false", "data.num_workers=0",
              "train.mixed_precision=no", "train.batch_size=4", "train.max_steps=3", "train.lr=1e-3",
              "train.ema_decay=0.9", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=100",
              "train.progress_bar=false", "train.warmup_steps=0", "model.lora.rank=4", "model.lora.alpha=2",
              "model.cfg_dropout=0.3", "model.weighting_scheme=none", "model.gradient_checkpointing=false",
              "model.sample_steps=1", "model.validation_samples=4", "eval.num_samples=4", "run.trackers=[]",
              "train.num_processes=2", f"run.output_dir={tmp_path}"]
    ok(ddp(*common, "run.name=ddp", timeout=600))
    ok(launch("zero3", *common, "run.name=z3", timeout=600))
    a, b = final(tmp_path / "ddp"), final(tmp_path / "z3")
    assert a and all("lora" in k for k in b), sorted(b)[:4]           # the adapters only
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 0   # trained (B starts at 0)
    d = max_diff(a, b)
    e = max_diff(final(tmp_path / "ddp", "ema_transformer.safetensors"), final(tmp_path / "z3", "ema_transformer.safetensors"))
    print(f"\nFlux LoRA, ZeRO-3 vs DDP (2 processes each): max |diff| adapters {d:.2e}, EMA {e:.2e}")
    assert d <= 1e-5 and e <= 1e-5, (d, e)
    ok(run_cli("export", str(tmp_path / "z3"), "--out", str(tmp_path / "export")))
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_alpha.safetensors"):
        assert any(k.startswith("transformer.") for k in load_file(str(tmp_path / "export" / name))), name
