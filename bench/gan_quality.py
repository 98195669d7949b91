"""Issue 10's quality bench: every GAN preset trained through the one launcher (`gentrain train`,
in-process Trainer), scored by the run's own eval, each beside its reference, as JSON.

Groups (--only, comma-separated):
  toy       gan/lsgan/wgan/wgan_gp/hinge on ring8 and grid25, --seeds seeds each: modes captured
            (PacGAN's released rule: >= 1 high-quality sample; also >= 20), % high-quality (within
            3 std of the nearest mode, 2,500 samples), energy distance beside real-vs-real; printed
            beside the published anchors below
  digits    dcgan_digits, stylegan_digits (FD on the offline digits classifier's features beside
            real-vs-real), cgan_digits (accuracy), cgan_text_digits (accuracy per prompt form);
            the conditional two also intra-class diversity (1.0 = as varied within a class as the
            real digits; eval/diversity_real: a real half's figure) and the bar 0.8
  pix2pix   pix2pix_edges2digits beside its L1-only U-Net ablation (model.gan_weight=0): held-out
            L1 / PSNR / classifier accuracy on the outputs
  cyclegan  cyclegan_digits_inverted: cycle L1 and label preservation
Every row also carries the untrained generator's figures (same seed, no steps).

  python bench/gan_quality.py --only toy --seeds 3            # ~1.5-2 h on 2 CPU cores (WGAN-GP: ~600 s a run)
  python bench/gan_quality.py --only digits,pix2pix,cyclegan  # ~30 min
  python bench/gan_quality.py --only digits --presets dcgan_digits,stylegan_digits   # just these
Writes bench/results/gan_quality.json (or --out), each row with the commit it ran at; --steps-scale
shortens every run (0.5 = half); --set KEY=VALUE overrides every run's config (an ablation: the
conditional presets before mode seeking, --set model.mode_seeking=0).
  python bench/gan_quality.py --only digits --presets cgan_digits,cgan_text_digits   # the diversity bar
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (modes, % high quality) on 8 gaussians on a ring / a 5x5 grid, as published
ANCHORS = {
    "VEEGAN (Srivastava et al. 2017), plain GAN": {"ring8": [1.0, None], "grid25": [3.3, None]},
    "PacGAN (Lin et al. 2018), GAN": {"ring8": [6.3, None], "grid25": [17.3, None]},
    "PacGAN (Lin et al. 2018), PacGAN4": {"ring8": [7.8, 95.9], "grid25": [24.8, 93.6]},
    "GDPP (Elfeki et al. 2019, read from a figure, approximate), WGAN-GP": {"ring8": [6.8, 59.6], "grid25": [24.2, 28.7]},
}
DIVERSITY_BAR = 0.8  # issue 27: the conditional presets' intra-class diversity, as a fraction of real digits'
TOY = ("gan_toy2d", "lsgan_toy2d", "wgan_toy2d", "wgan_gp_toy2d", "hinge_toy2d")


def run(preset: str, overrides: list[str], out_dir: Path, steps_scale: float) -> dict:
    import torch

    from gentrain.config import load_config
    from gentrain.train.loop import Trainer
    from gentrain.eval.metrics import evaluate
    from gentrain.objectives import build_objective

    cfg = load_config(preset, ["run.trackers=[]", "train.progress_bar=false", "train.sample_every=0",
                               "train.checkpoint_every=0", *overrides])
    cfg.train.max_steps = max(10, int(cfg.train.max_steps * steps_scale))
    torch.manual_seed(cfg.train.seed)
    fresh = build_objective(cfg)
    for net in fresh.nets.values():
        net.eval()
    base = evaluate(fresh, cfg)
    t0 = time.perf_counter()
    res = Trainer(cfg, out_dir / f"{preset}_{abs(hash(tuple(overrides))) % 10**6}").train()
    return {"preset": preset, "overrides": overrides, "steps": cfg.train.max_steps,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "trained": {k: v for k, v in res.items() if k.startswith("eval/")},
            "untrained": {k: v for k, v in base.items() if k.startswith("eval/")}}


def digits_data(root: Path) -> dict[str, Path]:
    from gentrain.data_pipeline.sources import build_source

    paths = {}
    for source in ("digits", "edges2digits", "digits_inverted"):
        for split in ("train", "test"):
            p = root / f"{source}16" / split
            if not (p / "index.json").exists():
                build_source(source, str(p), size=16, split=split)
        paths[source] = root / f"{source}16"
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="toy,digits,pix2pix,cyclegan")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--presets", default="", help="comma-separated: run only these presets of the chosen groups")
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeatable), e.g. --set model.mode_seeking=0 for an ablation")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_gan")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gan_quality.json")
    args = ap.parse_args()
    groups = set(args.only.split(","))
    wanted = set(filter(None, args.presets.split(",")))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows: list[dict] = []
    out = {"anchors": ANCHORS, "rows": rows, "seeds": args.seeds, "steps_scale": args.steps_scale}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    def add(row: dict) -> None:
        rows.append(row)
        row["commit"] = commit
        print(json.dumps({k: row[k] for k in ("preset", "overrides", "steps", "train_seconds")}), flush=True)
        print("  trained  ", {k: round(v, 4) for k, v in row["trained"].items()}, flush=True)
        print("  untrained", {k: round(v, 4) for k, v in row["untrained"].items()}, flush=True)
        if "eval/diversity" in row["trained"]:
            t = row["trained"]
            row["diversity_bar_met"] = t["eval/diversity"] >= DIVERSITY_BAR
            print(f"  intra-class diversity {t['eval/diversity']:.3f} of real digits' (a real half: "
                  f"{t['eval/diversity_real']:.3f}; bar {DIVERSITY_BAR}: {'met' if row['diversity_bar_met'] else 'MISSED'})",
                  flush=True)
        save()

    if "toy" in groups:
        for preset in (p for p in TOY if not wanted or p in wanted):
            for dist in ("ring8", "grid25"):
                for seed in range(args.seeds):
                    add(run(preset, [f"data.toy2d={dist}", f"train.seed={seed}"], args.work, args.steps_scale))
        summary = {}
        for preset in TOY:
            for dist in ("ring8", "grid25"):
                rs = [r["trained"] for r in rows if r["preset"] == preset and f"data.toy2d={dist}" in r["overrides"]]
                if rs:
                    summary[f"{preset}/{dist}"] = {
                        "modes": sum(r["eval/modes"] for r in rs) / len(rs),
                        "modes_min20": sum(r["eval/modes_min20"] for r in rs) / len(rs),
                        "hq_percent": 100 * sum(r["eval/hq_fraction"] for r in rs) / len(rs), "seeds": len(rs)}
        out["toy_summary"] = summary
        for k, v in summary.items():
            print(f"{k:28s} modes {v['modes']:.1f} (>=20 HQ: {v['modes_min20']:.1f})  HQ {v['hq_percent']:.1f}%")
        for k, v in ANCHORS.items():
            print(f"{k:28s} ring8 {v['ring8']}  grid25 {v['grid25']}")
    if groups & {"digits", "pix2pix", "cyclegan"}:
        data = digits_data(args.work / "data")
        shards = lambda s: [f"data.shards={data[s] / 'train'}", f"eval.shards={data[s] / 'test'}"]  # noqa: E731
        if "digits" in groups:
            for preset in ("dcgan_digits", "stylegan_digits", "cgan_digits", "cgan_text_digits"):
                if not wanted or preset in wanted:
                    add(run(preset, [*shards("digits"), *args.set], args.work, args.steps_scale))
        if "pix2pix" in groups and (not wanted or "pix2pix_edges2digits" in wanted):
            add(run("pix2pix_edges2digits", shards("edges2digits"), args.work, args.steps_scale))
            add(run("pix2pix_edges2digits", [*shards("edges2digits"), "model.gan_weight=0"], args.work, args.steps_scale))
        if "cyclegan" in groups and (not wanted or "cyclegan_digits_inverted" in wanted):
            add(run("cyclegan_digits_inverted", shards("digits_inverted"), args.work, args.steps_scale))
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
