"""The step's fast paths as config switches (train.compile, train.channels_last,
train.fused_optimizer): each trains to the losses eager training gives, within a stated tolerance,
and a run stopped and resumed with it on ends bitwise where the uninterrupted one ends. In-process
Trainers (no interpreter start per run); their speed is bench/step_speed.py's business."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, train_here
from gentrain.errors import GentrainError
from gentrain.config import load_config

pytestmark = pytest.mark.speed

UNET = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.sample_steps=4", "train.batch_size=16",
        "train.max_steps=4", "train.warmup_steps=0", "train.lr_schedule=constant", "train.ema_decay=0.9",
        "train.ema_warmup=false", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
        "train.progress_bar=false", "run.trackers=[]", "eval.num_samples=8", "data.num_workers=0"]
TOY = ["model.hidden=64", "train.batch_size=64", "train.max_steps=4", "train.warmup_steps=0", "train.ema_decay=0.9",
       "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0", "train.progress_bar=false",
       "run.trackers=[]", "eval.num_samples=64"]


def run(preset, root, name, *over, stop_at=None, resume=False):
    """Train in this process; the run's per-step losses and its final checkpoint's tensors."""
    from gentrain import checkpoint as ckpt

    trainer = train_here(preset, root, name, *over, stop_at=stop_at, resume=resume)
    loss = {m["step"]: m["loss/main"] for m in read_metrics(root / name) if "loss/main" in m}
    final = ckpt.find_resume_checkpoint(root / name / "checkpoints")
    files = [final / "model.safetensors", *final.glob("ema_*.safetensors")]
    assert len(files) == 2, files     # the weights and an EMA
    return loss, {f.name: load_file(str(f)) for f in files}, trainer


def max_diff(a, b):
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def same_run(straight, split):
    (la, wa, _), (lb, wb, _) = straight, split
    assert [lb[s] for s in (3, 4)] == [la[s] for s in (3, 4)], (la, lb)
    for f in wa:
        assert max_diff(wa[f], wb[f]) == 0.0, f


def test_channels_last_and_fused_adamw_match_eager_and_resume_bitwise(digits16, tmp_path):
    """A pixel UNet (diffusers UNet2DModel) on digits: NHWC weights and batches with torch's fused
    AdamW follow eager training to 1e-4 of the loss (other conv kernels, other summation order)
    and stay NHWC through the step; stopped at 2 and resumed, they end bitwise (the checkpoint
    holds ordinary contiguous safetensors, loaded back into the NHWC parameters)."""
    data = [f"data.shards={digits16 / 'train'}", "eval.shards=null"]
    fast = [*UNET, *data, "train.channels_last=true", "train.fused_optimizer=true"]
    eager = run("ddpm_digits", tmp_path, "eager", *UNET, *data)
    straight = run("ddpm_digits", tmp_path, "fast", *fast)
    (net,) = straight[2].raw_nets.values()
    conv = next(p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(g["fused"] for opt in straight[2].backend.optimizers for g in opt.param_groups)
    for s in range(1, 5):
        assert straight[0][s] == pytest.approx(eager[0][s], rel=1e-4, abs=1e-6), (s, straight[0], eager[0])
    assert max_diff(straight[1]["model.safetensors"], eager[1]["model.safetensors"]) < 1e-4
    run("ddpm_digits", tmp_path, "split", *fast, stop_at=2)
    split = run("ddpm_digits", tmp_path, "split", *fast, resume=True)
    same_run(straight, split)


def test_compile_matches_eager_resumes_bitwise_and_logs_its_cost(tmp_path):
    """torch.compile of the trained net (flow matching on 2-D points, with an EMA): the losses of
    eager training to 1e-5, a stop/resume bitwise, the module's state dict unchanged (no
    _orig_mod. prefix in checkpoints), and compile/seconds, graphs and graph breaks logged."""
    eager = run("flow_toy2d", tmp_path, "eager", *TOY)
    straight = run("flow_toy2d", tmp_path, "compiled", *TOY, "train.compile=default")
    for s in range(1, 5):
        assert straight[0][s] == pytest.approx(eager[0][s], rel=1e-5), (s, straight[0], eager[0])
    assert set(straight[1]["model.safetensors"]) == set(eager[1]["model.safetensors"])
    assert max_diff(straight[1]["model.safetensors"], eager[1]["model.safetensors"]) < 1e-5
    row = [m for m in read_metrics(tmp_path / "compiled") if "compile/graphs" in m][-1]
    assert row["compile/seconds"] > 0 and row["compile/graphs"] >= 1 and row["compile/graph_breaks"] >= 0, row
    run("flow_toy2d", tmp_path, "split", *TOY, "train.compile=default", stop_at=2)
    split = run("flow_toy2d", tmp_path, "split", *TOY, "train.compile=default", resume=True)
    same_run(straight, split)


def test_fast_path_switches_are_checked_before_training(tmp_path):
    with pytest.raises(GentrainError, match="config key 'train.compile': 'fastest'"):
        load_config("flow_toy2d", ["train.compile=fastest"])
    assert load_config("flow_toy2d", ["train.compile=no"]).train.compile == "no"   # YAML's bare no
    with pytest.raises(GentrainError, match="train.fused_optimizer.*'rmsprop', which has no fused kernel"):
        run("wgan_toy2d", tmp_path, "w", *TOY[:-1], "model.depth=2", "train.fused_optimizer=true")
