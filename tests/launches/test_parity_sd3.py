"""DDP parity of an SD3 LoRA fine-tune (test_parity.py's method and tolerances): adapters on the transformer
and on both CLIPs, whose prompts go through StableDiffusion3Pipeline.encode_prompt with the trained CLIPs
called through their DDP nets (adapters/sd3.py); u from the logit-normal density and the caption dropout
drawn through BatchRNG. 1 process at batch 8 against 2 processes at batch 4; and the same 2-process run
under DeepSpeed ZeRO-3, whose engine shards the frozen base of all three nets too (checked by hand: every
frozen parameter gets a ds_id and each rank keeps half of it), ends where DDP's ends."""
import pytest

from conftest import ok
from test_deepspeed import launch, max_diff
from test_parity import COMMON, assert_parity, final_weights, train_both
from tiny_pipelines_sd3 import SIZE, shared_sd3_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.deepspeed, pytest.mark.finetune]


def test_sd3_lora_on_the_transformer_and_both_clips(tmp_path, tmp_path_factory):
    from gentrain.data_pipeline.sources import build_source

    build_source("digits", str(tmp_path / "digits"), size=SIZE, count=32, max_samples=16)
    pipe = shared_sd3_pipeline(tmp_path_factory)
    common = [f"model.pretrained={pipe}", f"data.shards={tmp_path / 'digits'}", f"data.image_size={SIZE}",
              "data.channels=1", "data.shuffle_buffer=16", "data.random_flip=false", "train.mixed_precision=no",
              "train.max_steps=4", "train.lr=1e-3", "train.ema_decay=0.9", "train.grad_accum=1", "model.lora.rank=4",
              "model.lora.alpha=2", "model.text_encoder_lora.rank=2", "model.cfg_dropout=0.3",
              "model.gradient_checkpointing=false", "eval.num_samples=4", "model.validation_samples=4",
              "model.sample_steps=2"]
    one, two = train_both(tmp_path, "finetune_t2i_lora", 4, ["data.num_workers=2"], ["data.num_workers=0"], common)
    assert_parity(one, two)
    args = ["train", "finetune_t2i_lora", *COMMON, *common, f"run.output_dir={tmp_path}", "train.num_processes=2",
            "train.batch_size=4", "data.num_workers=0", "run.name=zero3"]
    ok(launch("zero3", *args))
    a, b = final_weights(two), final_weights(tmp_path / "zero3")
    print(f"\nSD3 LoRA, ZeRO-3 vs DDP (2 processes): max |diff| {max_diff(a, b):.3g} over {len(a)} tensors")
    assert all("lora" in k for k in b) and max_diff(a, b) <= 1e-5
    ck = max((tmp_path / "zero3" / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    ds_bytes = sum(f.stat().st_size for f in (ck / "deepspeed").rglob("*.pt"))
    base_bytes = sum(f.stat().st_size for net in ("transformer", "text_encoder", "text_encoder_2")
                     for f in (pipe / net).glob("*.safetensors"))
    assert 0 < ds_bytes < base_bytes, (ds_bytes, base_bytes)     # DeepSpeed's files: no copy of the frozen base
