"""Scaling out on this machine: 1 process (all threads) vs 2 processes (1 thread each) at the same
global batch, and DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 vs FSDP2 step time, all through the real launcher.

Stack: the t2i_flow_digits preset (UNet2DConditionModel, frozen MiniLM text encoder, latents of a
16-px AutoencoderKL; the autoencoder is untrained: speed does not depend on its weights) trained on
shards that `gentrain data cache` wrote, so a step is the UNet's forward + backward + AdamW + EMA.
images/s is the mean of metrics.jsonl's windows after the warm-up. Each variant runs alone; the
machine's load is recorded beside the figures. Prints JSON (and writes it with --out).

Targets (issue 9): 2 processes >= 0.9x the images/s of 1 process; ZeRO-2 step <= 1.15x DDP's.
DDP also runs with its all-reduce options (train.ddp_bucket_view, train.ddp_comm_hook=fp16); ZeRO-2
with one DeepSpeed option changed runs when --only names it (ZERO2_OPTIONS), and so does DDP with
all gradients in one bucket (ddp_2proc_one_bucket: its all-reduce after the whole backward).
fsdp2_2proc (issue 29): the shipped fsdp2 config; its step time against DDP's and ZeRO-3's is in the
ratios (also with --only ddp_2proc zero3_2proc fsdp2_2proc, which runs just those three).

    python bench/scaling.py [--steps 60] [--warmup 20] [--batch 64] [--out bench/results/scaling.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(tmp: Path) -> tuple[Path, Path]:
    """Digits shards, an untrained f4 AutoencoderKL folder, and the cached shards."""
    from gentrain.data_pipeline.cache import cache_shards, write_cache_index
    from gentrain.data_pipeline.sources import build_source
    from gentrain.config import load_config
    from gentrain.modeling.autoencoders import KLAutoencoder

    build_source("digits", str(tmp / "images"), size=16, split="train")
    ae = load_config("vae_digits").model
    torch.manual_seed(0)
    KLAutoencoder(1, list(ae.block_out_channels), ae.latent_channels, ae.layers_per_block, ae.norm_num_groups,
                  16).model.save_pretrained(str(tmp / "vae"))
    t2i = load_config("t2i_flow_digits", [f"model.latent.autoencoder={tmp / 'vae'}"]).model.latent
    written = cache_shards(str(tmp / "images"), str(tmp / "cached"), autoencoder=str(tmp / "vae"),
                           text_encoder=t2i.text_encoder, max_length=t2i.max_length, image_size=16, channels=1)
    write_cache_index(str(tmp / "cached"), str(tmp / "images"), [(w["name"], w["samples"]) for w in written], {})
    return tmp / "cached", tmp / "vae"


def _run(name: str, launch: list[str], nproc: int, extra: list[str], batch: int, steps: int, warmup: int,
         shards: Path, vae: Path, out: Path, env: dict) -> dict:
    args = ["train", "t2i_flow_digits", *extra, f"data.shards={shards}", f"model.latent.autoencoder={vae}",
            f"train.max_steps={steps}", f"train.batch_size={batch // nproc}", f"train.num_processes={nproc}",
            "train.log_every=10", "train.sample_every=0", "train.checkpoint_every=0", "train.progress_bar=false",
            "eval.num_samples=20", "eval.digits=false", f"run.output_dir={out}", f"run.name={name}"]
    cmd = [sys.executable, *launch, "-m", "gentrain", *args] if launch else [sys.executable, "-m", "gentrain", *args]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > warmup]
    ips = sum(rates) / len(rates)
    return {"processes": nproc, "images_per_s": round(ips, 1), "step_ms": round(1000 * batch / ips, 2),
            "wall_s": round(time.perf_counter() - t0, 1), "load_before": round(load0, 2)}


# ZeRO-2 with one DeepSpeed option changed (run them by name with --only; DeepSpeed's defaults otherwise)
ZERO2_OPTIONS = {"zero2_2proc_no_reduce_scatter": {"reduce_scatter": False},
                 "zero2_2proc_no_contiguous_gradients": {"contiguous_gradients": False},
                 "zero2_2proc_buckets_5e6": {"reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6}}


def _zero2_config(tmp: Path, name: str, options: dict) -> Path:
    """The shipped zero2 accelerate config, its DeepSpeed settings moved into a JSON file with `options`
    added (every size 'auto': gentrain fills them)."""
    import yaml

    from gentrain.launch import accelerate_config_path

    acc = yaml.safe_load(accelerate_config_path("zero2").read_text())
    js, yml = tmp / f"{name}.json", tmp / f"{name}.yaml"
    js.write_text(json.dumps({"zero_optimization": {"stage": acc["deepspeed_config"]["zero_stage"], **options},
                              **dict.fromkeys(("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                               "train_batch_size", "gradient_clipping"), "auto")}))
    acc["deepspeed_config"] = {"deepspeed_config_file": str(js), "zero3_init_flag": False}
    acc.pop("mixed_precision", None)   # the JSON's bf16/fp16 sections decide (gentrain fills them)
    yml.write_text(yaml.safe_dump(acc))
    return yml


def measure(steps: int, warmup: int, batch: int, only: list[str] | None = None) -> dict:
    from gentrain.launch import accelerate_config_path

    tmp = Path(tempfile.mkdtemp(prefix="gentrain-scaling-"))
    shards, vae = _prepare(tmp)
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    accel = ["-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2", "--dynamo_backend", "no"]
    ddp = [*accel, "--multi_gpu", "--mixed_precision", "no"]
    variants = {
        "one_process": ([], 1, []),   # torch uses every core (2 threads here)
        "ddp_2proc": (ddp, 2, []),    # torchrun sets OMP_NUM_THREADS=1 per process
        # DDP's all-reduce options (train.ddp_*): gradients as bucket views (no copy into the
        # buckets), then also all-reduced in fp16 (torch's compress hook: half the bytes)
        "ddp_2proc_bucket_view": (ddp, 2, ["train.ddp_bucket_view=true"]),
        "ddp_2proc_bucket_view_fp16": (ddp, 2, ["train.ddp_bucket_view=true", "train.ddp_comm_hook=fp16"]),
        "zero2_2proc": ([*accel, "--config_file", str(accelerate_config_path("zero2"))], 2, []),
        "zero3_2proc": ([*accel, "--config_file", str(accelerate_config_path("zero3"))], 2, []),
        # FSDP2 (gentrain's fully_shard per block, fp32, reshard after forward), same launcher
        "fsdp2_2proc": ([*accel, "--config_file", str(accelerate_config_path("fsdp2"))], 2, []),
    }
    res = {}
    if only:
        variants.update({k: ([*accel, "--config_file", str(_zero2_config(tmp, k, v))], 2, [])
                         for k, v in ZERO2_OPTIONS.items()})
        # DDP with all gradients in one bucket: its all-reduce waits for the whole backward, as
        # ZeRO-2's reduction does on CPU (DeepSpeed's CPU accelerator has no streams to overlap on)
        variants["ddp_2proc_one_bucket"] = (ddp, 2, ["train.ddp_bucket_mb=4096"])
    for name, (launch, nproc, extra) in variants.items():
        if only and name not in only:
            continue
        launch = [*launch, "--main_process_port", str(_port())] if launch else []
        res[name] = _run(name, launch, nproc, extra, batch, steps, warmup, shards, vae, tmp / "runs", env)
        print(name, res[name], file=sys.stderr)
    fsdp2 = {f"fsdp2_vs_{k[:-6]}_step_time": round(res["fsdp2_2proc"]["step_ms"] / res[k]["step_ms"], 3)
             for k in ("ddp_2proc", "zero3_2proc") if k in res and "fsdp2_2proc" in res}
    if only:
        return {"variants": res, "ratios": fsdp2, "load_after": round(os.getloadavg()[0], 2)}
    one, ddp_, view, fp16, z2, z3 = (res[k] for k in list(variants)[:6])
    return {
        "bench": "scaling", "stack": "t2i_flow_digits on cached digits latents (UNet [64, 128], MiniLM states)",
        "global_batch": batch, "steps": steps, "warmup_steps_excluded": warmup, "cores": os.cpu_count(),
        "variants": res,
        "ratios": {
            "two_processes_vs_one_images_per_s": round(ddp_["images_per_s"] / one["images_per_s"], 3),
            "two_processes_bucket_view_vs_one_images_per_s": round(view["images_per_s"] / one["images_per_s"], 3),
            "two_processes_bucket_view_fp16_vs_one_images_per_s": round(fp16["images_per_s"] / one["images_per_s"], 3),
            "zero2_vs_ddp_step_time": round(z2["step_ms"] / ddp_["step_ms"], 3),
            "zero3_vs_ddp_step_time": round(z3["step_ms"] / ddp_["step_ms"], 3), **fsdp2,
        },
        "targets": {"two_processes_vs_one_images_per_s": ">= 0.9", "zero2_vs_ddp_step_time": "<= 1.15"},
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these variants (no ratios); also "
                         + ", ".join([*ZERO2_OPTIONS, "ddp_2proc_one_bucket"]))
    a = ap.parse_args()
    result = measure(a.steps, a.warmup, a.batch, a.only)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
