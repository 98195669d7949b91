"""Step speed against the machine (issue 13, first part): for the denoisers gentrain ships, at
their preset's batch and latent size, one training step (forward, MSE on a flow target, backward,
AdamW) in a bare loop, side by side in one run: eager (AdamW foreach, torch's default), fused
AdamW, channels_last (UNets), bf16 autocast, torch.compile (default mode; its compile time apart).

Each row: images/s, step ms, peak CUDA memory (on CPU the process's peak RSS so far), model FLOPs of one step
(FlopCounterMode, 2 per multiply-add, attention added by hand where the counter gives 0; no
gradient checkpointing, so no recompute is counted) and utilisation = achieved FLOP/s over the
peak of a large matmul measured in the same run (fp32 for fp32 rows, bf16 for bf16 rows).

usage: python bench/step_speed.py [--nets unet_demo,unet_mid,dit_small,dit_b2w] [--seconds 6] [--out ...]
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

# name: (preset, overrides of model.*, latent channels, latent size, batch, text dim (0: class labels))
NETS = {
    "unet_demo": ("t2i_flow_digits", {}, 4, 8, 64, 384),
    "unet_mid": ("t2i_flow_digits", {"block_out_channels": [128, 256, 256]}, 4, 16, 16, 384),
    "dit_small": ("dit_class_digits", {}, 4, 8, 64, 0),
    # DiT-B/2's width (12 heads x 64) and patch 2 at 16x16 latents, 4 of its 12 layers on a CPU
    "dit_b2w": ("dit_class_digits", {"dit_layers": 4, "dit_heads": 12, "dit_head_dim": 64, "patch_size": 2}, 4, 16, 8, 0),
}


def build(name: str, device: str):
    from gentrain.launch.config import load_config
    from gentrain.train.objectives.denoising import build_denoiser

    preset, over, c, s, batch, dim = NETS[name]
    m = load_config(preset).model
    for k, v in over.items():
        setattr(m, k, v)
    m.gradient_checkpointing = False
    space = SimpleNamespace(latent_channels=c, latent_size=lambda: s)
    cond = SimpleNamespace(kind="text" if dim else "class", dim=dim)
    net = build_denoiser(m, space, cond).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g).to(device)
    extra = {"emb": torch.randn(batch, 32, dim, generator=g).to(device)} if dim else \
        {"labels": torch.randint(0, 10, (batch,), generator=g).to(device)}
    return net, x, extra, batch


def make_step(net, x, extra, opt, autocast_dtype=None):
    def step():
        noise = torch.randn_like(x)
        t = torch.rand(x.shape[0], device=x.device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = net(xt, t * 1000, **extra)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x)
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


def run_variant(name: str, variant: str, device: str, seconds: float, flops: float, peaks: dict) -> dict:
    torch.manual_seed(0)
    net, x, extra, batch = build(name, device)
    is_unet = name.startswith("unet")
    if variant == "channels_last":
        if not is_unet:
            return {}
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fused = variant == "fused_adamw"
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True if fused else None, foreach=None if fused else True)
    dtype = torch.bfloat16 if variant == "bf16_autocast" else None
    if variant.startswith("compile"):
        import torch._dynamo as dynamo

        dynamo.reset()
        net = torch.compile(net, mode=None if variant == "compile" else variant.split(":", 1)[1])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, step_s, n = timed(make_step(net, x, extra, opt, dtype), seconds, device)
    row = {"net": name, "variant": variant, "batch": batch, "steps_timed": n, "step_ms": round(step_s * 1e3, 2),
           "images_s": round(batch / step_s, 1), "first_step_s": round(first, 2),
           "model_flops_per_step": flops, "achieved_tflops": round(flops / step_s / 1e12, 4)}
    peak = peaks["bf16" if dtype is not None else "fp32"]
    row["utilisation"] = round(flops / step_s / peak, 4)
    if variant.startswith("compile"):
        row["compile_s"] = round(first - step_s, 2)
        from torch._dynamo.utils import counters

        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
    if device == "cuda":
        row["peak_cuda_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    else:   # the process's peak so far: it only grows over the rows
        row["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--variants", default="eager,fused_adamw,channels_last,bf16_autocast,compile")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per row (after warm-up)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step_speed.json"))
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "matmul_peak_tflops": {k: round(v / 1e12, 4) for k, v in peaks.items()},
           "rows": []}
    for name in a.nets.split(","):
        net, x, extra, _ = build(name, device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        f = model_flops(make_step(net, x, extra, opt))
        res.setdefault("flops", {})[name] = {**f, "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
        del net, opt
        base = None
        for variant in a.variants.split(","):
            row = run_variant(name, variant, device, a.seconds, f["total"], peaks)
            if not row:
                continue
            base = base or row["step_ms"]
            row["speedup_vs_eager"] = round(base / row["step_ms"], 3)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
