"""DDP parity: the same run as 1 process at batch 2B and as 2 processes (a real `accelerate launch
--multi_gpu`, gloo on CPU) at batch B reaches the same weights after K steps.

What makes it hold: every rank keeps the same torch RNG stream and takes its rows of each
per-sample draw made at the global batch (objectives' `BatchRNG`), the global batch of a step is
the same data whatever the layout (toy2d: drawn whole and sliced; shards: R*W lanes of B/W
each), and DDP's gradient mean over ranks is the mean over the global batch. What is left is fp32
rounding: the 2-process gradient is (sum over B + sum over B) / 2 through an all-reduce, the
1-process one a sum over 2B in another blocking order, a relative difference of ~1e-7.

Tolerance. Adam's first step is lr * g / (|g| + eps): for a weight whose gradient is near eps
(1e-8) a rounding difference d in g becomes lr * d / eps in the weight, up to a few % of one
step for the few such weights (measured: the whole max |diff| appears at step 1 and does not
grow over later steps; for the rest, d / |g| stays ~1e-7). So the test asserts
- max |diff| <= ATOL = 5e-5 (5% of one step at lr 1e-3) over every tensor, nets and EMA, and
- all but BULK_FRACTION = 0.1% of the weights within BULK_ATOL = 1e-6 (measured: 0.006%): a real
  layout dependence (one sample's noise, data or dropout differing) changes most gradients by
  O(1/B), hence most weights by ~1e-4 after a few steps; this is the sensitive check;
- not vacuous: the weights moved from their initial values by more than 20 x ATOL.

Nets with BatchNorm (none in these families yet; a PatchGAN with norm=batch) would need
SyncBatchNorm for parity: per-rank batch statistics differ from those of the whole batch.
"""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, free_port, make_tiny_sd_pipeline, ok, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ACCEL = ["-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
COMMON = ["train.progress_bar=false", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
          "train.warmup_steps=0", "run.trackers=[]"]
ATOL, BULK_ATOL, BULK_FRACTION = 5e-5, 1e-6, 1e-3   # see the module doc


def train_both(tmp_path: Path, preset: str, batch: int, one: list[str], two: list[str], common: list[str]) -> tuple[Path, Path]:
    """Run `preset` as 1 process at batch 2*batch and as 2 processes at `batch`; the two run dirs.
    Both on one thread per process (what accelerate launch sets), so the kernels are the same."""
    env = cli_env(OMP_NUM_THREADS="1")
    args = ["train", preset, *COMMON, *common, f"run.output_dir={tmp_path}"]
    r = run_cli(*args, f"train.batch_size={2 * batch}", *one, "run.name=one", env=env, timeout=300)
    ok(r)
    r = run_cli(sys.executable, *ACCEL, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
                "-m", "gentrain", *args, "train.num_processes=2", f"train.batch_size={batch}", *two, "run.name=two",
                module=False, env=env, timeout=300)
    ok(r)
    return tmp_path / "one", tmp_path / "two"


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every trained net's weights (model*.safetensors) and EMA (ema_*.safetensors) of the last checkpoint."""
    ck = max((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    files = sorted(ck.glob("model*.safetensors")) + sorted(ck.glob("ema_*.safetensors"))
    assert any(f.name.startswith("ema_") for f in files)
    return {f"{f.stem}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def initial_weights(run: Path) -> dict[str, torch.Tensor]:
    """The same keys before the first step: the nets as the Trainer builds them (seeded alike on every
    rank), saved by accelerate in the loop's order (model, model_1, ...); an EMA starts at its net."""
    from accelerate.utils import set_seed

    from gentrain.config import load_config
    from gentrain.objectives import build_objective

    cfg = load_config(str(run / "config.yaml"))
    set_seed(cfg.train.seed)
    objective = build_objective(cfg)
    out = {}
    for i, (name, net) in enumerate(objective.nets.items()):
        # a partial net (LoRA adapters on a frozen base) is saved and averaged by its trainable tensors
        partial, trainable = name in objective.partial_nets, {k for k, p in net.named_parameters() if p.requires_grad}
        out.update({f"{'model' if i == 0 else f'model_{i}'}/{k}": v for k, v in net.state_dict().items()
                    if not partial or k in trainable})
        if name in objective.ema_nets:
            out.update({f"ema_{name}/{k}": p.detach() for k, p in net.named_parameters() if not partial or k in trainable})
    return out


def assert_parity(one: Path, two: Path) -> None:
    a, b, init = final_weights(one), final_weights(two), initial_weights(one)
    assert a.keys() == b.keys() == init.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    off = float((diff > BULK_ATOL).float().mean())
    moved = {kind: torch.cat([(a[k] - init[k]).abs().flatten() for k in a if k.startswith(kind)])
             for kind in ("model", "ema_")}
    print(f"\nparity {one.parent.name}: {len(a)} tensors, {diff.numel()} values; max |1x2B - 2xB| {float(diff.max()):.3g} "
          f"(atol {ATOL:g}), {off:.3%} over {BULK_ATOL:g}; |final - init| max/median: nets "
          f"{float(moved['model'].max()):.3g}/{float(moved['model'].median()):.3g}, EMA "
          f"{float(moved['ema_'].max()):.3g}/{float(moved['ema_'].median()):.3g}")
    assert float(diff.max()) <= ATOL, f"1 x 2B and 2 x B differ by {float(diff.max()):.3g} > {ATOL:g}"
    assert off <= BULK_FRACTION, f"{off:.3%} of the weights differ by more than {BULK_ATOL:g}"
    for kind, m in moved.items():   # the weights did move, by far more than the tolerance
        assert float(m.max()) > 20 * ATOL, f"{kind} weights moved by {float(m.max()):.3g} only"


def test_flow_toy2d(tmp_path):
    """The 2-D flow MLP (uniform t, Gaussian noise) on toy2d points: batches drawn whole and sliced."""
    one, two = train_both(tmp_path, "flow_toy2d", 64, [], [], ["train.max_steps=8", "model.sample_steps=2",
                                                               "eval.num_samples=100"])
    assert_parity(one, two)


def test_latent_text_to_image_flow_on_shards(t2i_stack, tmp_path):
    """Latent flow (logit-normal t, posterior samples from the cached latents, CFG caption dropout) on
    shards: 1 process with 2 workers (2 lanes of B) against 2 processes with none (1 lane of B each)."""
    root = t2i_stack
    common = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_head_dim=4",
              f"model.latent.autoencoder={root / 'vae'}", f"model.latent.text_encoder={root / 'clip'}",
              "model.latent.cfg_dropout=0.3", "model.sample_steps=2", f"data.shards={root / 'cached'}",
              "data.shuffle_buffer=16", "train.max_steps=6"]
    one, two = train_both(tmp_path, "t2i_flow_digits", 8, ["data.num_workers=2"], ["data.num_workers=0"], common)
    assert_parity(one, two)


def test_lora_finetune_adapters(t2i_stack, tmp_path):
    """LoRA adapters (UNet and CLIP text encoder) fine-tuning a tiny StableDiffusionPipeline on image
    shards: the VAE posterior sample, timesteps, noise and caption dropout all come from BatchRNG."""
    root = t2i_stack
    pipe = make_tiny_sd_pipeline(tmp_path / "sd", "epsilon")
    common = [f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", "data.image_size=16", "data.channels=1",
              "data.shuffle_buffer=16", "data.random_flip=false", "train.mixed_precision=no", "train.max_steps=6",
              "train.lr=1e-3", "train.ema_decay=0.9", "train.grad_accum=1", "model.lora.rank=4", "model.lora.alpha=2",
              "model.text_encoder_lora.rank=2", "model.cfg_dropout=0.3", "model.gradient_checkpointing=false",
              "model.min_snr_gamma=5", "eval.num_samples=8", "model.validation_samples=8"]
    one, two = train_both(tmp_path, "finetune_t2i_lora", 8, ["data.num_workers=2"], ["data.num_workers=0"], common)
    assert_parity(one, two)


VQ_RESTART = """
import torch, torch.distributed as dist
from gentrain.distributed.collectives import global_rows
dist.init_process_group("gloo")
r = dist.get_rank()
flat = torch.arange(40.).reshape(20, 2)          # the global batch's encoder outputs, 20 rows
for cut in (10, 8):                                # equal halves, and unequal ones (aspect buckets)
    torch.manual_seed(r)                           # streams that differ: rank 0's pick is used
    mine = global_rows(flat[:cut] if r == 0 else flat[cut:], 7)
    torch.manual_seed(0)
    alone = flat[torch.randint(0, 20, (7,))]       # what one process holding all 20 rows picks
    assert torch.equal(mine, alone), (cut, mine, alone)
dist.destroy_process_group()
print("same rows")
"""


def test_vq_dead_code_restart_picks_the_same_rows_on_every_rank(tmp_path):
    script = tmp_path / "vq_restart.py"
    script.write_text(VQ_RESTART)
    r = run_cli(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(script), module=False, env=cli_env(OMP_NUM_THREADS="1"),
                timeout=120)
    assert r.returncode == 0 and r.stdout.count("same rows") == 2, r.stdout[-2000:] + r.stderr[-2000:]
