"""Trainer overhead: the same model, data and batch through gentrain's Trainer and through a bare
hand-written torch loop, alternating in one process. Prints JSON with both step times and the ratio.

Both loops do the same maths per step: AdamW, gradient clipping, the LR schedule and an EMA update
(diffusers EMAModel). The Trainer adds what it owns: accelerate's wrappers, the NaN guard, the
RNG guard around data, logging (metrics.jsonl + TensorBoard), tqdm and checkpoints at the default
cadence (train.log_every / checkpoint_every of TrainConfig). Preview sampling is real work whose
cost depends on the family's preview size, not loop overhead: it is off in the timed rounds and
its time is reported on its own (preview_s). Main-thread CPU time is reported too (*_cpu_ms,
cpu_ratio): with OMP_NUM_THREADS=1 it is the whole step's, and it moves far less than wall time
when other processes load the machine (`--hidden 8 --batch 8` leaves mostly the loop's host work).
Usage: python bench/trainer_overhead.py [--rounds 5] [--steps 200] [--hidden 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare_loop(objective_net, stream_iter, steps, t, ema, cpu=None):
    """The hand-written reference: the same maths, nothing else. Appends its main-thread CPU
    seconds per step to `cpu` when given."""
    import torch.nn.functional as F

    from gentrain.maths.paths import LinearPath, sample_time

    path = LinearPath()
    opt, sched = t["opt"], t["sched"]
    start, start_cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        x0 = next(stream_iter)["x"]
        noise = torch.randn_like(x0)
        tt = sample_time(x0.shape[0], "uniform", x0.device)
        pred = objective_net(path.interpolate(x0, noise, tt), tt * 1000)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective_net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(objective_net.parameters())
    if cpu is not None:
        cpu.append((time.thread_time() - start_cpu) / steps)
    return (time.perf_counter() - start) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150, help="steps per round per loop")
    ap.add_argument("--hidden", type=int, default=256, help="default: the flow_toy2d preset's net")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from gentrain.data_pipeline.toy2d import Toy2DStream
    from gentrain.config import TrainConfig, load_config
    from gentrain.modeling.mlp import TimeConditionedMLP
    from gentrain.train.loop import Trainer
    from gentrain.train.runs import prepare_run_dir

    defaults = TrainConfig()
    tmp = tempfile.mkdtemp(prefix="gentrain-bench-")
    total = args.rounds * args.steps + 10
    cfg = load_config("flow_toy2d", [
        f"model.hidden={args.hidden}", f"model.depth={args.depth}", f"train.batch_size={args.batch}",
        f"train.max_steps={total}", f"train.log_every={defaults.log_every}",
        "train.sample_every=0", f"train.checkpoint_every={defaults.checkpoint_every}",
        "train.ema_decay=0.999", "train.progress_bar=true", f"run.output_dir={tmp}", "run.name=bench",
        "eval.num_samples=500"])
    run_dir, _ = prepare_run_dir(cfg, "none")
    trainer = Trainer(cfg, run_dir)
    torch.manual_seed(0)
    net = TimeConditionedMLP(2, args.hidden, args.depth)
    # the Trainer's AdamW (train/optim.py): the same betas and weight decay (flow_toy2d's 0, not torch's default 0.01)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    sched = get_scheduler(cfg.train.lr_schedule, opt, num_warmup_steps=cfg.train.warmup_steps,
                          num_training_steps=total)
    ema = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, foreach=True)
    bare_iter = iter(Toy2DStream(cfg.data.toy2d, args.batch, seed=1))

    bar = tqdm(total=total, disable=False, file=sys.stderr, desc="trainer")
    trainer_times, bare_times, trainer_cpu, bare_cpu = [], [], [], []
    bare_loop(net, bare_iter, 10, {"opt": opt, "sched": sched}, ema)  # warm-up both
    trainer._train_until(10, bar)
    for r in range(args.rounds):
        start, start_cpu = time.perf_counter(), time.thread_time()
        trainer._train_until(trainer.step + args.steps, bar)
        trainer_times.append((time.perf_counter() - start) / args.steps)
        trainer_cpu.append((time.thread_time() - start_cpu) / args.steps)
        bare_times.append(bare_loop(net, bare_iter, args.steps, {"opt": opt, "sched": sched}, ema, bare_cpu))
    bar.close()
    start = time.perf_counter()
    trainer.preview()
    preview_s = time.perf_counter() - start
    tr, ba = statistics.median(trainer_times), statistics.median(bare_times)
    result = {
        "bench": "trainer_overhead", "model": f"TimeConditionedMLP(hidden={args.hidden}, depth={args.depth})",
        "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps,
        "cadence": {"log_every": defaults.log_every, "checkpoint_every": defaults.checkpoint_every},
        "preview_s": round(preview_s, 3), "preview_every_default": defaults.sample_every,
        "trainer_step_ms": round(tr * 1000, 3), "bare_step_ms": round(ba * 1000, 3),
        "ratio": round(tr / ba, 4), "target": 1.02,
        "trainer_cpu_ms": round(statistics.median(trainer_cpu) * 1000, 3),
        "bare_cpu_ms": round(statistics.median(bare_cpu) * 1000, 3),
        "cpu_ratio": round(statistics.median(trainer_cpu) / statistics.median(bare_cpu), 4),
        "trainer_step_ms_rounds": [round(x * 1000, 3) for x in trainer_times],
        "bare_step_ms_rounds": [round(x * 1000, 3) for x in bare_times],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
