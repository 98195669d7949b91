"""The Trainer's step against bench/trainer_overhead.py's bare loop (the same maths), counted in
tensor operations rather than timed: the ops the Trainer adds to a step are the host work it costs
on a GPU (each a kernel launch, a .item() a sync). docs/benchmarks.md lists them and why."""
import collections
import importlib.util
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import reset_accelerate_state

REPO = Path(__file__).resolve().parents[2]


class CountOps(TorchDispatchMode):
    """Every aten op dispatched while active (forward, backward, optimizer, EMA), by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def bench_module():
    spec = importlib.util.spec_from_file_location("trainer_overhead", REPO / "bench" / "trainer_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_trainer_step_adds_at_most_five_tensor_ops_to_the_bare_loops(tmp_path):
    """Between log rows, one flow_toy2d step of the Trainer runs the bare loop's ops plus: the two
    running sums for the logged means (loss, gradient norm), the loss's detach, and the NaN
    guard's two reads of loss and norm (.item(): on a GPU the step's one sync). Before issue 28's
    second pass it added 23 (accelerate's loss / 1 and its backward, its second norm over a
    one-element stack, a zero_grad, zeros / full / divide for the loss total, isfinite x2 and &)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from gentrain.config import load_config
    from gentrain.data_pipeline.toy2d import Toy2DStream
    from gentrain.modeling.mlp import TimeConditionedMLP
    from gentrain.train.loop import Trainer

    reset_accelerate_state()
    cfg = load_config("flow_toy2d", ["model.hidden=8", "model.depth=2", "train.batch_size=8", "train.max_steps=100",
                                     "train.log_every=1000", "train.checkpoint_every=0", "train.sample_every=0",
                                     "train.ema_decay=0.999", "train.progress_bar=false",
                                     f"run.output_dir={tmp_path}", "run.name=ops"])
    trainer = Trainer(cfg, tmp_path / "ops")
    net = TimeConditionedMLP(2, 8, 2)
    t = cfg.train
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = get_scheduler(t.lr_schedule, opt, num_warmup_steps=t.warmup_steps, num_training_steps=100)
    ema = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, foreach=True)
    stream = iter(Toy2DStream(cfg.data.toy2d, 8, seed=1))
    bare_loop = bench_module().bare_loop
    bar = tqdm(disable=True)
    trainer._train_until(2, bar)   # first steps: optimizer state made, schedules' first-step warnings
    bare_loop(net, stream, 2, {"opt": opt, "sched": sched}, ema)

    def ops(run, steps):
        with CountOps() as counted:
            run(steps)
        return sum(counted.ops.values()), counted.ops

    def train(steps):   # each call ends with a log row, its iterator started anew: the same in both
        trainer._train_until(trainer.step + steps, bar)

    def bare(steps):
        bare_loop(net, stream, steps, {"opt": opt, "sched": sched}, ema)

    try:   # per step: the difference between a 30-step and a 10-step window of each
        (m10, _), (m30, mine), (b10, _), (b30, base) = ops(train, 10), ops(train, 30), ops(bare, 10), ops(bare, 30)
    finally:
        trainer.acc.end_training()
        reset_accelerate_state()
    extra = ((m30 - m10) - (b30 - b10)) / 20
    detail = {k: mine[k] - base[k] for k in set(mine) | set(base) if mine[k] != base[k]}
    assert extra <= 5, f"the Trainer adds {extra:.2f} ops a step to the bare loop's (30 steps: {detail})"
