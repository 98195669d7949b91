"""A full fine-tune of an SD3 pipeline (the session's tiny StableDiffusion3Pipeline: the transformer trains, the
VAE, both CLIPs and T5 stay frozen outside the engines) under DeepSpeed ZeRO-3 (and ZeRO-2) on 2 CPU processes
ends where the same run under DDP ends: the transformer, its EMA (ZeRO-3: gathered from the 1-D partitions)
and every logged loss. LoRA on a ZeRO-3-sharded frozen base: test_parity_sd3.py."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import ok, read_metrics
from test_deepspeed import ddp, final, launch, max_diff
from tiny_pipelines_sd3 import SIZE, shared_sd3_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.deepspeed, pytest.mark.finetune]


def full_args(pipe, digits, out):
    return ["train", "finetune_t2i", f"model.pretrained={pipe}", f"data.shards={digits}", f"data.image_size={SIZE}",
            "data.channels=1", "data.random_flip=false", "data.num_workers=0", "data.shuffle_buffer=16",
            "train.mixed_precision=no", "train.batch_size=4", "train.max_steps=4", "train.lr=1e-3",
            "train.ema_decay=0.9", "train.grad_accum=1", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=100", "train.progress_bar=false", "train.warmup_steps=0",
            "model.gradient_checkpointing=false", "model.sample_steps=2", "model.validation_samples=4",
            "eval.num_samples=4", "run.trackers=[]", "train.num_processes=2", f"run.output_dir={out}"]


@pytest.fixture(scope="module")
def sd3_full_ddp(tmp_path_factory):
    """(the pipeline, the digits shards, the DDP reference run's directory)."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("sd3_full")
    build_source("digits", str(root / "digits"), size=SIZE, count=32, max_samples=16)
    pipe = shared_sd3_pipeline(tmp_path_factory)
    ok(ddp(*full_args(pipe, root / "digits", root), "run.name=ddp"))
    return pipe, root / "digits", root / "ddp"


# ZeRO-2 passes too (1.49e-8, 25 s a launch here): left out of the suite for its time budget; add "zero2" to run it
@pytest.mark.parametrize("config", ["zero3"])
def test_full_finetune_under_zero_ends_where_ddp_ends(sd3_full_ddp, tmp_path, config):
    pipe, digits, ref = sd3_full_ddp
    ok(launch(config, *full_args(pipe, digits, tmp_path), "run.name=zero"))
    run = tmp_path / "zero"
    for f in ("model.safetensors", "ema_transformer.safetensors"):
        diff = max_diff(final(ref, f), final(run, f))
        print(f"\nSD3 full fine-tune, {config} vs DDP, {f}: max |diff| {diff:.3g}")
        assert diff <= 1e-5, (f, diff)
    loss = lambda d: [m["loss/main"] for m in read_metrics(d) if "loss/main" in m]
    assert len(loss(run)) == 4 and loss(run) == pytest.approx(loss(ref), rel=1e-6)
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = final(run)
    assert all(v.dtype == torch.float32 for v in trained.values())
    moved = max((trained[f"model.{k}"] - v).abs().max().item() for k, v in base.items())
    assert moved > 1e-3, moved        # not vacuous: the whole transformer trained, by far more than the tolerance
    assert (run / "checkpoints" / "step_4" / "deepspeed" / "transformer").is_dir()
