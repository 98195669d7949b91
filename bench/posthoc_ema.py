"""Issue 33's measured part: sample quality against the post-hoc EMA length (docs/posthoc-ema.md),
beside the preset's own fixed `train.ema_decay` and the raw (no-EMA) weights, as JSON.

Two runs of one preset, same seed and steps, through the in-process Trainer (`gentrain train`):
  posthoc   train.ema=posthoc train.ema_decay=0 (profiles train.posthoc_sigma_rels, 0.05 and 0.10 by
            default; a snapshot every --snapshot-every steps), then `gentrain ema RUN --sweep ...`
            at the final step: the family's own eval at each length (FD on the digits judge's
            features for dcgan_digits; the shapes checker for t2i_flow_shapes)
  fixed     the preset as it is (its train.ema_decay, diffusers' EMAModel with warmup): its EMA and
            its raw weights, scored by the same eval
The fixed EMA's own relative length (sigma_rel: std of its kernel over the weights' steps / steps)
is computed from diffusers' EMAModel itself at the run's steps, so the fixed figure sits on the curve.

  nice -n 10 python bench/posthoc_ema.py                 # dcgan_digits at 150 steps (not the preset's 4,000: a GAN only
                                                         # begun): ~15 min a run niced on 2 cores at load 9 (~5.6 s a
                                                         # step; ~0.07 s alone), then ~2 min of evals
  nice -n 10 python bench/posthoc_ema.py --steps 4000    # the preset's length (~5 min a run alone on 2 cores)
  python bench/posthoc_ema.py --preset t2i_flow_shapes   # its 20,000 steps; needs data/shapes32 and exports/vae_shapes
                                                         # (see the preset's header): not run yet
To train the two runs side by side (as bench/RESULTS.md's figures were), train each with this file's
`train` in its own process, then: python bench/posthoc_ema.py --posthoc-run RUN_P --fixed-run RUN_F
The lr schedule (linear to 0 for dcgan_digits) ends at --steps, so a shorter run is a whole run, not a cut one.
Writes bench/results/posthoc_ema_PRESET.json (or --out), with the commit it ran at.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_STEPS = {"dcgan_digits": 150}   # what fits this shared machine; other presets: their own max_steps
LENGTHS = "0.02,0.04,0.05,0.06,0.08,0.10,0.15,0.20,0.25"
# lower is better for these figures; the rest (accuracies) higher
LOWER_BETTER = ("eval/fd", "eval/energy_distance", "eval/fid")


def fixed_ema_sigma_rel(decay: float, warmup: bool, updates: int) -> float:
    """The relative length of diffusers' EMAModel after `updates` steps: feed it the step index
    (and its square) as a scalar weight; the EMA is then the kernel's mean (second moment)."""
    import torch
    from diffusers.training_utils import EMAModel

    moments = []
    for power in (1, 2):
        p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        ema = EMAModel([p], decay=decay, use_ema_warmup=warmup)
        for k in range(1, updates + 1):
            p.data.fill_(float(k) ** power)
            ema.step([p])
        moments.append(float(ema.shadow_params[0]))
    mean, second = moments
    return (max(second - mean * mean, 0.0) ** 0.5) / updates


def prepare_data(preset: str, work: Path) -> list[str]:
    """Config overrides pointing the preset at its data; builds the digits shards if missing."""
    if preset.endswith("_digits"):
        from gentrain.data_pipeline.sources import build_source

        for split in ("train", "test"):
            p = work / "data" / "digits16" / split
            if not (p / "index.json").exists():
                build_source("digits", str(p), size=16, split=split)
        return [f"data.shards={work / 'data/digits16/train'}", f"eval.shards={work / 'data/digits16/test'}"]
    if preset == "t2i_flow_shapes":
        for need in (ROOT / "data" / "shapes32", ROOT / "exports" / "vae_shapes"):
            if not need.exists():
                sys.exit(f"--preset t2i_flow_shapes needs {need}: build it as the preset's header says "
                         "(gentrain data build --source shapes ...; gentrain train vae_shapes; gentrain export ...)")
        return [f"data.shards={ROOT / 'data/shapes32'}", f"model.latent.autoencoder={ROOT / 'exports/vae_shapes'}"]
    return []


def train(preset: str, overrides: list[str], run_dir: Path) -> dict:
    import torch

    from gentrain.config import load_config
    from gentrain.train.loop import Trainer

    cfg = load_config(preset, ["run.trackers=[]", "train.progress_bar=false", "train.sample_every=0",
                               "train.checkpoint_every=0", *overrides])
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    res = Trainer(cfg, run_dir).train()
    return {"run": str(run_dir), "overrides": overrides, "train_seconds": round(time.perf_counter() - t0, 1),
            "final_eval": {k: v for k, v in res.items() if k.startswith("eval/")}}


def reuse(run_dir: Path, steps: int, seed: int, ema: str) -> dict:
    """A run trained earlier (by this bench's `train`) instead of a new one: its config must match."""
    from gentrain.train.runs import load_run_config

    t = load_run_config(run_dir).train
    if (t.max_steps, t.seed, t.ema) != (steps, seed, ema):
        sys.exit(f"{run_dir}: trained with max_steps {t.max_steps}, seed {t.seed}, train.ema {t.ema}; "
                 f"this bench needs {steps}, {seed}, {ema}")
    return {"run": str(run_dir), "reused": True}


def evaluate_run(run_dir: Path, use_ema: bool, num_samples: int | None) -> dict:
    from gentrain.eval.metrics import evaluate
    from gentrain.train.runs import load_trained

    cfg, objective, _ = load_trained(run_dir, use_ema=use_ema)
    if num_samples:
        cfg.eval.num_samples = num_samples
    return {k: v for k, v in evaluate(objective, cfg).items() if k.startswith("eval/")}


def start_sweep(run_dir: Path, lengths: str, num_samples: int | None) -> subprocess.Popen:
    """`gentrain ema RUN --sweep ...` as a user runs it, in its own process (the reference evals run
    meanwhile); its stdout is the curve's JSON (finish_sweep)."""
    cmd = [sys.executable, "-m", "gentrain", "ema", str(run_dir), "--sweep", lengths]
    if num_samples:
        cmd += ["--num-samples", str(num_samples)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_sweep(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode:
        sys.exit(f"gentrain ema --sweep failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return json.loads(stdout[stdout.index("{"):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dcgan_digits", help="dcgan_digits (default) or t2i_flow_shapes")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps for both runs (default: 150 for dcgan_digits, "
                    "the preset's own for the others)")
    ap.add_argument("--lengths", default=LENGTHS, help="sigma_rel values of the sweep, comma-separated")
    ap.add_argument("--snapshot-every", type=int, default=None,
                    help="train.posthoc_snapshot_every (default: steps / 40, so 40 snapshots)")
    ap.add_argument("--num-samples", type=int, default=None, help="eval.num_samples (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for both runs")
    ap.add_argument("--posthoc-run", type=Path, default=None,
                    help="reuse this posthoc run (trained by this bench earlier, same steps and seed) instead of training")
    ap.add_argument("--fixed-run", type=Path, default=None, help="reuse this fixed-decay run likewise")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_posthoc_ema")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from gentrain.config import load_config

    preset_cfg = load_config(args.preset, [])
    steps = args.steps or DEFAULT_STEPS.get(args.preset, preset_cfg.train.max_steps)
    every = args.snapshot_every or max(1, steps // 40)
    decay, warmup = preset_cfg.train.ema_decay, preset_cfg.train.ema_warmup
    out_path = args.out or ROOT / "bench" / "results" / f"posthoc_ema_{args.preset}.json"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tag = f"{args.preset}_s{steps}_seed{args.seed}_{time.strftime('%Y%m%d%H%M%S')}"
    common = [*prepare_data(args.preset, args.work), f"train.max_steps={steps}", f"train.seed={args.seed}", *args.set]
    out: dict = {"preset": args.preset, "steps": steps, "preset_steps": preset_cfg.train.max_steps, "seed": args.seed,
                 "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_average_at_start": os.getloadavg()[0], "snapshot_every": every}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    print(f"{args.preset}: {steps} steps (preset: {preset_cfg.train.max_steps}), seed {args.seed}", flush=True)
    posthoc_dir = args.posthoc_run or args.work / f"{tag}_posthoc"
    fixed_dir = args.fixed_run or args.work / f"{tag}_fixed"
    out["posthoc_run"] = (reuse(posthoc_dir, steps, args.seed, "posthoc") if args.posthoc_run else
                          train(args.preset, [*common, "train.ema=posthoc", "train.ema_decay=0",
                                              f"train.posthoc_snapshot_every={every}"], posthoc_dir))
    print(f"  posthoc run: {out['posthoc_run']}", flush=True)
    save()
    out["fixed_run"] = reuse(fixed_dir, steps, args.seed, "fixed") if args.fixed_run else train(args.preset, common, fixed_dir)
    print(f"  fixed run: {out['fixed_run']}", flush=True)
    save()
    t0 = time.perf_counter()
    proc = start_sweep(posthoc_dir, args.lengths, args.num_samples)
    out["fixed_ema"] = {"ema_decay": decay, "ema_warmup": warmup,
                        "sigma_rel": round(fixed_ema_sigma_rel(decay, warmup, steps), 4) if decay > 0 else None,
                        **evaluate_run(fixed_dir, True, args.num_samples)}
    out["raw_fixed_run"] = evaluate_run(fixed_dir, False, args.num_samples)
    out["raw_posthoc_run"] = evaluate_run(posthoc_dir, False, args.num_samples)
    out["sweep"] = finish_sweep(proc)
    out["evals_seconds"] = round(time.perf_counter() - t0, 1)
    save()

    curve = out["sweep"]["curve"]
    keys = [k for k in curve[0] if k.startswith("eval/")]
    main_key = next((k for k in LOWER_BETTER if k in keys), keys[0])
    sign = 1 if main_key in LOWER_BETTER else -1
    best = min(curve, key=lambda r: sign * r[main_key])
    out["best"] = {"by": main_key, "sigma_rel": best["sigma_rel"], main_key: best[main_key]}
    save()

    fmt = lambda d: "  ".join(f"{k[5:]} {d[k]:.4g}" for k in keys if k in d)  # noqa: E731
    print(f"\npost-hoc EMA curve at step {out['sweep']['step']} ({out['sweep']['step'] // every} snapshots of "
          f"0.05/0.10; residual = kernel fit, 0 exact):")
    for r in curve:
        res = max(r["residual"].values())
        print(f"  sigma_rel {r['sigma_rel']:<5g} {fmt(r)}   residual {res:.2g}{'   <- best' if r is best else ''}")
    fe = out["fixed_ema"]
    print(f"  reference: fixed ema_decay {decay} (warmup {warmup}; its sigma_rel ~{fe['sigma_rel']}): {fmt(fe)}")
    print(f"  reference: raw weights, no EMA: {fmt(out['raw_posthoc_run'])} (posthoc run), "
          f"{fmt(out['raw_fixed_run'])} (fixed run)")
    print(f"best length by {main_key}: sigma_rel {best['sigma_rel']:g} ({best[main_key]:.4g}) against "
          f"{fe[main_key]:.4g} for the fixed ema_decay {decay}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
