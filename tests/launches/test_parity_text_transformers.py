"""Parity of the PixArt cross-attention DiT (test_parity.py's method and tolerances): 1 process at batch 2B
against 2 processes at batch B, under DDP (`accelerate launch --multi_gpu`, gloo on CPU) and under
DeepSpeed ZeRO-2 (the shipped zero2 config, fp32), reach the same weights and EMA after 6 steps. Latent
flow on cached 16-px digits latents and tiny-CLIP states with their masks, CFG caption dropout 0.3 (the
dropped caption's states, mask and pooled vector all swapped), logit-normal t.

One difference from test_parity's bulk check: the attention key biases (to_k.bias) have a gradient that is
exactly zero in exact arithmetic (softmax(q.k + q.b) over keys does not depend on q.b, the same for every
key), so what they get is rounding noise, which Adam turns into steps of its own: they differ between the
layouts by up to ~1.5e-5 (measured), within ATOL, but they are 0.4 % of this tiny net's values, over the
0.1 % the bulk check allows. They are held to ATOL only; every other value to the bulk check."""
import sys

import pytest

from conftest import cli_env, free_port, ok, run_cli
from gentrain.launch import accelerate_config_path
from test_parity import ATOL, BULK_ATOL, BULK_FRACTION, COMMON, final_weights, initial_weights, train_both


def assert_parity(one, two):
    import torch

    a, b, init = final_weights(one), final_weights(two), initial_weights(one)
    assert a.keys() == b.keys() == init.keys()
    diff = {k: (a[k] - b[k]).abs().flatten() for k in a}
    top = max(float(d.max()) for d in diff.values())
    bulk = torch.cat([d for k, d in diff.items() if not k.endswith("to_k.bias")])
    off = float((bulk > BULK_ATOL).float().mean())
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    print(f"\nparity {two.name}: max |1x2B - 2xB| {top:.3g} (atol {ATOL:g}); {off:.3%} of {bulk.numel()} values "
          f"(all but the key biases) over {BULK_ATOL:g}; moved {moved:.3g}")
    assert top <= ATOL and off <= BULK_FRACTION and moved > 20 * ATOL, (top, off, moved)

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.t2i]


def pixart_args(root):
    return ["model.dit_layers=2", "model.dit_heads=2", "model.dit_head_dim=8", "model.patch_size=1",
            f"model.latent.autoencoder={root / 'vae'}", f"model.latent.text_encoder={root / 'clip'}",
            "model.latent.max_length=16", "model.latent.cfg_dropout=0.3", "model.sample_steps=2",
            f"data.shards={root / 'cached'}", "data.image_size=16", "data.channels=1", "data.shuffle_buffer=16",
            "train.max_steps=6", "train.lr=1e-3", "eval.shapes=false", "eval.num_samples=4"]


@pytest.fixture(scope="module")
def ddp_runs(t2i_stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart_parity")
    return train_both(root, "t2i_pixart_shapes", 8, ["data.num_workers=2"], ["data.num_workers=0"], pixart_args(t2i_stack))


def test_pixart_ddp(ddp_runs):
    assert_parity(*ddp_runs)


@pytest.mark.deepspeed
def test_pixart_zero2(ddp_runs, t2i_stack):
    one = ddp_runs[0]
    args = ["train", "t2i_pixart_shapes", *COMMON, *pixart_args(t2i_stack), f"run.output_dir={one.parent}",
            "train.num_processes=2", "train.batch_size=8", "data.num_workers=0", "run.name=zero2"]
    r = run_cli(sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
                str(free_port()), "--config_file", str(accelerate_config_path("zero2")), "-m", "gentrain", *args,
                module=False, env=cli_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"), timeout=300)
    ok(r)
    assert_parity(one, one.parent / "zero2")
