"""Step speed against the machine (issue 13): for the denoisers gentrain ships, at their preset's
batch and latent size, one training step (forward, MSE on a flow target, backward, AdamW), and for
the DCGAN pair of dcgan_digits one D step and one G step (non-saturating loss), in a bare loop, side by side in one run: eager (torch's default AdamW: foreach on CUDA, a
for-loop on CPU), fused AdamW, channels_last (UNets), bf16 autocast, torch.compile (default mode;
its compile time apart), gradient checkpointing (its cost: the FLOPs counted stay the model's,
without the recompute), and the same step run by gentrain's Trainer (variant `trainer+...`: its
data iterator, autocast, gradient clipping and NaN guard, schedules, logging around the same net
and synthetic latents; `trainer_vs_bare` is its speed over the bare row with the same features).

Each row: images/s, step ms, peak CUDA memory (on CPU the process's peak RSS so far), model FLOPs of one step
(FlopCounterMode, 2 per multiply-add, attention added by hand where the counter gives 0; no
gradient checkpointing, so no recompute is counted) and utilisation = achieved FLOP/s over the
peak of a large matmul measured in the same run (fp32 for fp32 rows, bf16 for bf16 rows).

usage: python bench/step_speed.py [--nets unet_demo,unet_mid,dit_small,dit_b2w,dcgan] [--variants ...] [--seconds 6]
                                  [--repeats 1] [--out ...]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gentrain.train.flops import matmul_peak, model_flops  # noqa: E402
from gentrain.objectives.base import Objective, Phase  # noqa: E402

# name: (preset, overrides of model.*, latent channels, latent size, batch, text dim (0: class labels)[, tokens])
NETS = {
    "unet_demo": ("t2i_flow_digits", {}, 4, 8, 64, 384),
    "unet_mid": ("t2i_flow_digits", {"block_out_channels": [128, 256, 256]}, 4, 16, 16, 384),
    "dit_small": ("dit_class_digits", {}, 4, 8, 64, 0),
    # DiT-B/2's width (12 heads x 64) and patch 2 at 16x16 latents, 4 of its 12 layers on a CPU
    "dit_b2w": ("dit_class_digits", {"dit_layers": 4, "dit_heads": 12, "dit_head_dim": 64, "patch_size": 2}, 4, 16, 8, 0),
    # the DCGAN pair of dcgan_digits (G and D at 32 base channels, 16 px, z 64): one D step + one G step
    "dcgan": ("dcgan_digits", {}, 1, 16, 64, 0),
}
GANS = ("dcgan",)


def build(name: str, device: str, nets: dict = NETS, checkpointing: bool = False):
    from gentrain.config import load_config
    from gentrain.objectives.denoising import build_denoiser

    preset, over, c, s, batch, dim, *tokens = nets[name]
    tokens = tokens[0] if tokens else 32
    if name in GANS:
        g = torch.Generator().manual_seed(0)
        return GANPair(preset, c, s).to(device), torch.rand(batch, c, s, s, generator=g).to(device) * 2 - 1, {}, batch
    if callable(preset):   # a net built directly (bench/gpu_step.py's SD-1.5 UNet)
        net = preset(c, s, dim, **over).to(device)
    else:
        m = load_config(preset).model
        for k, v in over.items():
            setattr(m, k, v)
        m.gradient_checkpointing = checkpointing
        space = SimpleNamespace(latent_channels=c, latent_size=lambda: s)
        cond = SimpleNamespace(kind="text" if dim else "class", dim=dim)
        net = build_denoiser(m, space, cond).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g).to(device)
    extra = {"emb": torch.randn(batch, tokens, dim, generator=g).to(device)} if dim else \
        {"labels": torch.randint(0, 10, (batch,), generator=g).to(device)}
    return net, x, extra, batch


class GANPair(torch.nn.Module):
    """The generator and discriminator of a GAN preset, held together (one .to(), one parameter count)."""

    def __init__(self, preset: str, c: int, s: int):
        super().__init__()
        from gentrain.config import load_config
        from gentrain.modeling.gan.dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_init_

        m = load_config(preset).model
        self.z_dim = m.z_dim
        self.gen = dcgan_init_(DCGANGenerator(z_dim=m.z_dim, image_size=s, channels=c, base=m.base_channels))
        self.disc = dcgan_init_(DCGANDiscriminator(image_size=s, channels=c, base=m.d_base_channels))


def gan_losses(gen, disc, real, z_dim):
    """(D loss, G loss) of the non-saturating GAN, as the gan family computes them: D on real and
    on a generated batch made without a graph, G through D on a fresh batch."""
    F = torch.nn.functional
    n = real.shape[0]

    def d_loss():
        with torch.no_grad():
            fake = gen(torch.randn(n, z_dim, device=real.device))
        return F.softplus(-disc(real).float()).mean() + F.softplus(disc(fake).float()).mean()

    def g_loss():
        return F.softplus(-disc(gen(torch.randn(n, z_dim, device=real.device))).float()).mean()
    return d_loss, g_loss


def make_gan_step(pair, x, opts, autocast_dtype=None, gen=None, disc=None):
    gen = pair.gen if gen is None else gen
    disc = pair.disc if disc is None else disc
    d_loss, g_loss = gan_losses(gen, disc, x, pair.z_dim)
    opt_d, opt_g = opts

    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = d_loss()
        loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        pair.disc.requires_grad_(False)   # the G step does not compute D's gradients (the loop's phases)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = g_loss()
        loss.backward()
        pair.disc.requires_grad_(True)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        return loss
    return step


def flow_loss(net, x, extra):
    """Flow matching's MSE on the velocity target at a uniform t, for one batch of latents x."""
    noise = torch.randn_like(x)
    t = torch.rand(x.shape[0], device=x.device)
    xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    return torch.nn.functional.mse_loss(net(xt, t * 1000, **extra).float(), noise - x)


def make_step(net, x, extra, opt, autocast_dtype=None):
    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = flow_loss(net, x, extra)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def timed(step, seconds: float, device: str, min_steps: int = 3) -> tuple[float, float, int]:
    """(first-call seconds, mean step seconds after warm-up, steps timed)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return first, (time.perf_counter() - t0) / n, n


class SyntheticDenoiser(Objective):
    """The bare step's loss as a gentrain Objective: the same net, latents and conditioning, run
    by gentrain's Trainer (its data iterator, autocast, clipping and NaN guard, schedules, logging)."""
    data_key = "x"

    def __init__(self, net, x, extra):
        self.nets, self.x, self.extra = {"main": net}, x, extra

    def loss(self, phase, batch):
        return flow_loss(self.nets["main"], self.x, self.extra), {}

    def batch_size(self, batch):
        return self.x.shape[0]


class SyntheticGAN(SyntheticDenoiser):
    """The GAN pair's D and G steps as the two phases of an Objective (the gan family's layout)."""

    def __init__(self, pair, x, extra):
        self.nets, self.x, self.z_dim = {"gen": pair.gen, "disc": pair.disc}, x, pair.z_dim

    def phases(self):
        return [Phase("disc", ("disc",)), Phase("gen", ("gen",))]

    def loss(self, phase, batch):
        d_loss, g_loss = gan_losses(self.nets["gen"], self.nets["disc"], self.x, self.z_dim)
        return (d_loss() if phase == "disc" else g_loss()), {}


def trainer_step(net, x, extra, features: set, mode, device: str):
    """A step function running one Trainer step per call over chunks: (warm-up, time(n))."""
    import tempfile

    from accelerate.state import AcceleratorState, GradientState, PartialState

    from gentrain.config import load_config
    from gentrain.train.loop import Trainer

    for s in (AcceleratorState, GradientState, PartialState):
        s._reset_state(*([True] if s is AcceleratorState else []))
    over = ["train.max_steps=1000000000", "train.log_every=1000000000", "train.sample_every=0",
            "train.checkpoint_every=0", "train.progress_bar=false", "run.trackers=[]", "train.ema_decay=0",
            "train.max_grad_norm=0", "train.warmup_steps=0", "train.lr=1e-4", "data.num_workers=0",
            "train.batch_size=8", f"train.mixed_precision={'bf16' if 'bf16_autocast' in features else 'no'}",
            f"train.compile={mode or 'default' if 'compile' in features else 'no'}",
            f"train.fused_optimizer={'fused_adamw' in features}",
            f"run.output_dir={tempfile.mkdtemp(prefix='gentrain_bench_')}", "run.name=trainer"]
    cfg = load_config("flow_toy2d", over)
    trainer = Trainer(cfg, os.path.join(cfg.run.output_dir, "trainer"), objective=(SyntheticGAN if isinstance(net, GANPair) else SyntheticDenoiser)(net, x, extra))

    def run(n: int) -> None:
        trainer._train_until(trainer.step + n, bar=_NoBar())
    return run


class _NoBar:
    def update(self, *_):
        pass

    def set_postfix(self, *_):
        pass


def timed_chunks(run, seconds: float, device: str, per_step_guess: float, min_steps: int = 3):
    """(first-call seconds, mean step seconds, steps timed) for a step function that runs n steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    run(1)
    sync()
    first = time.perf_counter() - t0
    run(1)
    n = max(min_steps, int(seconds / max(per_step_guess, 1e-6)))
    sync()
    t0 = time.perf_counter()
    run(n)
    sync()
    return first, (time.perf_counter() - t0) / n, n


def parse_variant(variant: str) -> tuple[set, str | None]:
    """'trainer+bf16_autocast+compile:max-autotune' -> ({trainer, bf16_autocast, compile}, mode)."""
    features, mode = set(), None
    for f in variant.split("+"):
        if f.startswith("compile:"):
            f, mode = "compile", f.split(":", 1)[1]
        if f != "eager":
            features.add(f)
    unknown = features - {"trainer", "fused_adamw", "channels_last", "bf16_autocast", "compile", "checkpointing"}
    if unknown:
        raise SystemExit(f"unknown variant feature(s) {sorted(unknown)} in {variant!r}")
    return features, mode


def run_variant(name: str, variant: str, device: str, seconds: float, flops: float, peaks: dict,
                nets: dict = NETS, guess: float = 0.0) -> dict:
    features, mode = parse_variant(variant)
    torch.manual_seed(0)
    net, x, extra, batch = build(name, device, nets, checkpointing="checkpointing" in features)
    if "channels_last" in features:
        if "unet" not in name and name not in GANS:
            return {}
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    import torch._dynamo as dynamo

    dynamo.reset()
    dtype = torch.bfloat16 if "bf16_autocast" in features else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if "trainer" in features:
        first, step_s, n = timed_chunks(trainer_step(net, x, extra, features, mode, device), seconds, device,
                                        guess or 1.0)
    else:
        fused = "fused_adamw" in features
        adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True if fused else None)  # noqa: E731 - else torch's default
        if name in GANS:
            opts = (adamw(net.disc.parameters()), adamw(net.gen.parameters()))
            pair = [torch.compile(m, mode=mode) for m in (net.gen, net.disc)] if "compile" in features else [None, None]
            step = make_gan_step(net, x, opts, dtype, *pair)
        else:
            opt = adamw(net.parameters())
            step = make_step(torch.compile(net, mode=mode) if "compile" in features else net, x, extra, opt, dtype)
        first, step_s, n = timed(step, seconds, device)
    row = {"net": name, "variant": variant, "batch": batch, "steps_timed": n, "step_ms": round(step_s * 1e3, 2),
           "images_s": round(batch / step_s, 1), "first_step_s": round(first, 2),
           "model_flops_per_step": flops, "achieved_tflops": round(flops / step_s / 1e12, 4)}
    peak = peaks["bf16" if dtype is not None else "fp32"]
    row["utilisation"] = round(flops / step_s / peak, 4)
    if "vendor_bf16" in peaks and dtype is not None:
        row["mfu_vendor_peak"] = round(flops / step_s / peaks["vendor_bf16"], 4)
    if "compile" in features:
        row["compile_s"] = round(first - step_s, 2)
        from torch._dynamo.utils import counters

        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
    if device == "cuda":
        row["peak_cuda_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    else:   # the process's peak so far: it only grows over the rows
        row["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def run_net(name: str, variants: list[str], device: str, seconds: float, peaks: dict, res: dict,
            nets: dict = NETS, repeats: int = 1) -> None:
    """Every variant of one net, side by side; with repeats, the variants run in turn that many
    times and each keeps its fastest row (a busy machine only ever slows a row down). Then the
    speed-up over the first variant (eager), and a Trainer row's ratio to the bare row with the
    same features."""
    net, x, extra, _ = build(name, device, nets)
    if name in GANS:
        f = model_flops(make_gan_step(net, x, (torch.optim.AdamW(net.disc.parameters()),
                                               torch.optim.AdamW(net.gen.parameters()))))
    else:
        f = model_flops(make_step(net, x, extra, torch.optim.AdamW(net.parameters(), lr=1e-4)))
    res.setdefault("flops", {})[name] = {**f, "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
    del net
    best: dict = {}
    bare_key = lambda v: "+".join(sorted(parse_variant(v)[0] - {"trainer"})) or "eager"  # noqa: E731
    for _ in range(repeats):
        for variant in variants:
            bare = next((best[v] for v in best if "trainer" not in v and bare_key(v) == bare_key(variant)), None)
            row = run_variant(name, variant, device, seconds, f["total"], peaks, nets,
                              guess=bare["step_ms"] / 1e3 if bare else 0.0)
            if row and (variant not in best or row["step_ms"] < best[variant]["step_ms"]):
                if "compile_s" in row and variant in best:   # the first compile's time (later ones hit its cache)
                    row["compile_s"] = max(row["compile_s"], best[variant]["compile_s"])
                best[variant] = row
    for variant, row in best.items():
        row["repeats"] = repeats
        if "trainer" in variant:
            bare = next((best[v] for v in best if "trainer" not in v and bare_key(v) == bare_key(variant)), None)
            if bare:
                row["trainer_vs_bare"] = round(bare["step_ms"] / row["step_ms"], 3)
        row["speedup_vs_eager"] = round(next(iter(best.values()))["step_ms"] / row["step_ms"], 3)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--variants", default="eager,trainer,fused_adamw,channels_last,bf16_autocast,compile,"
                                          "trainer+compile", help="comma-separated; a variant joins features "
                                          "with '+': trainer, fused_adamw, channels_last, bf16_autocast, "
                                          "checkpointing, compile[:MODE] (eager: none)")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per row (after warm-up)")
    ap.add_argument("--repeats", type=int, default=1, help="run the variants in turn this many times; best row kept")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step_speed.json"))
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "matmul_peak_tflops": {k: round(v / 1e12, 4) for k, v in peaks.items()},
           "rows": []}
    for name in a.nets.split(","):
        run_net(name, a.variants.split(","), device, a.seconds, peaks, res, repeats=a.repeats)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
