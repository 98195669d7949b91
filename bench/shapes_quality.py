"""Issue 32's quality figure: text-to-image nets trained on the same cached shapes latents for the
same wall time, scored by the analytic shapes checker (gentrain/eval/shapes.py), as JSON lines.

One invocation trains one net (`--net unet|pixart|mmdit`: the presets t2i_flow_shapes,
t2i_pixart_shapes, t2i_mmdit_shapes) through `gentrain train` for `--minutes` of wall time
(counted from its first step: train.log_every=1, the clock starts at metrics.jsonl's first line, so
start-up is not counted), stops it with SIGUSR1 (the run saves a checkpoint and exits 75, the stop
`gentrain train --help` documents), records the steps it reached, then scores N held-out
captions (`--n`, default 500) with its EMA weights and, in the same invocation, the checker's
references on the same captions:
  real        the held-out scenes themselves with their own captions (the checker's ceiling, 1.000)
  autoencoder those scenes through the run's autoencoder, encode (posterior mean) then decode:
              the ceiling of a latent model
  wrong       the scenes paired with the captions of other scenes (half the set away): a floor
  noise       Gaussian noise images: the other floor (~0)
and appends one row to a JSON-lines file (`--out`, default bench/results/shapes_quality.jsonl), so
the nets and budgets can run in separate invocations. `--report` prints the table from that file:
the nets ranked at equal time (by their worst attribute, then `all`), and the best net's quality at
every budget it was run for (half and twice the time: quality against compute).

The data (shapes at 32 px), the autoencoder (vae_shapes, trained, exported) and the cache (`gentrain
data cache`: posteriors + MiniLM states) are built once under `--work` (keyed by --count and
--vae-steps) and shared by every run. Training uses the preset as shipped except: the cached shards,
the bench's autoencoder, train.lr_schedule=constant (after the preset's warm-up; so a run stopped by
time is no less finished than a longer one, and half/twice the time lie on one trajectory),
train.max_steps large (the clock stops the run), no periodic samples/checkpoints; `--set KEY=VALUE`
adds overrides. Equal time assumes the cores are the bench's: each row records the training
process's CPU seconds and the share of the machine other jobs took meanwhile (/proc/stat).

  python bench/shapes_quality.py --net unet --minutes 45       # one row (plus ~10 min of set-up once)
  python bench/shapes_quality.py --report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gentrain.eval.shapes import ATTRIBUTES as ATTRS  # noqa: E402  (the checker's five attributes)

NETS = {"unet": "t2i_flow_shapes", "pixart": "t2i_pixart_shapes", "mmdit": "t2i_mmdit_shapes"}
SIZE = 32
BIG_STEPS = 10_000_000  # train.max_steps: the clock, not the step count, ends a bench run


# ------------------------------------------------------------------------------------------ scoring

def reference_images(n: int, seed: int, size: int = SIZE):
    """The held-out scenes (eval.seed `seed`) as (n, 3, size, size) in [-1, 1], and their captions."""
    import numpy as np
    import torch

    from gentrain.data_pipeline.sources import make_shape_scene
    from gentrain.eval.shapes import HELDOUT_SEED_OFFSET

    scenes = [make_shape_scene(i, size=size, seed=seed + HELDOUT_SEED_OFFSET) for i in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(s[0].convert("RGB"), np.float32) for s in scenes]))
    return x.permute(0, 3, 1, 2) / 127.5 - 1, [s[1] for s in scenes]


def _scores(res: dict) -> dict:
    return {k: res[k] for k in (*ATTRS, "all")}


def references(n: int, seed: int, vae: Any = None, size: int = SIZE) -> dict:
    """The checker on the held-out captions: real scenes, the autoencoder's round trip of them
    (with `vae`, a diffusers AutoencoderKL), the scenes with other scenes' captions, noise."""
    import torch

    from gentrain.eval.shapes import check

    x, captions = reference_images(n, seed, size)
    out = {"real": _scores(check(x, captions))}
    if vae is not None:
        with torch.no_grad():
            z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
            out["autoencoder"] = _scores(check(vae.decode(z).sample.float().clamp(-1, 1), captions))
    shift = max(1, n // 2)
    out["wrong"] = _scores(check(x, captions[shift:] + captions[:shift]))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    out["noise"] = _scores(check(noise, captions))
    return out


def score_objective(objective: Any, cfg: Any, n: int, guidance: Optional[float] = None, seed: int = 0) -> dict:
    """The checker's accuracies of n samples of the held-out captions (eval.seed's scenes) drawn by
    `objective` (the library's own evaluator: gentrain.eval.shapes.evaluate_text_to_image_shapes)."""
    from gentrain.eval.shapes import evaluate_text_to_image_shapes

    res = evaluate_text_to_image_shapes(objective, cfg, n=n, guidance_scale=guidance, seed=seed)
    out = {k: res[f"eval/shapes_{k}"] for k in (*ATTRS, "all")}
    out["n"], out["n_position"] = int(res["eval/shapes_n"]), int(res["eval/shapes_n_position"])
    out["guidance_scale"] = res.get("eval/guidance_scale")
    return out


# ------------------------------------------------------------------------------------------ set-up

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _gentrain(*args: Any, log: Path) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gentrain", *map(str, args)]
    print(f"$ {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    with open(log, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=_env())
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd[2:])}; see {log}:\n{log.read_text()[-3000:]}")
    return p


def prepare(work: Path, count: int, vae_steps: int, max_length: int) -> dict:
    """Shapes shards, the exported autoencoder and the cached shards under work/, built once and
    reused while their parameters match (a folder per parameter set)."""
    from gentrain.data_pipeline.sources import build_source

    key = {"count": count, "vae_steps": vae_steps, "max_length": max_length, "size": SIZE}
    base = work / f"shapes{SIZE}_c{count}_v{vae_steps}_l{max_length}"
    stamp = base / "prepared.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    data, cached, vae = base / "data", base / "cached", base / "vae"
    if not (data / "index.json").exists():
        print(f"building {count} shapes scenes at {SIZE} px in {data}", file=sys.stderr, flush=True)
        build_source("shapes", str(data), size=SIZE, count=count)
    if not (vae / "config.json").exists():
        _gentrain("train", "vae_shapes", f"data.shards={data}", f"train.max_steps={vae_steps}", f"run.output_dir={base}",
                  "run.name=vae_run", "train.progress_bar=false", "train.sample_every=0", "run.trackers=[]",
                  "--resume", "auto", log=base / "logs" / "vae.log")
        _gentrain("export", base / "vae_run", "--out", vae, log=base / "logs" / "vae_export.log")
    if not (cached / "index.json").exists():
        _gentrain("data", "cache", "--shards", data, "--out", cached, "--autoencoder", vae, "--image-size", SIZE,
                  "--channels", 3, "--max-length", max_length, log=base / "logs" / "cache.log")
    info = {**key, "data": str(data), "cached": str(cached), "autoencoder": str(vae),
            "prepare_seconds": round(time.perf_counter() - t0, 1)}
    stamp.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------ training

def _busy_cpu_s(cpus: Optional[set] = None) -> float:
    """CPU seconds spent busy (all processes) on `cpus` (default: the whole machine), from /proc/stat."""
    total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if not name.startswith("cpu") or (name == "cpu") != (cpus is None):
                continue
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            v = [int(x) for x in vals]
            total += sum(v[:8]) - v[3] - v[4]
    return total / os.sysconf("SC_CLK_TCK")


def train_for(preset: str, marks: list[float], prep: dict, run_dir: Path, extra: list[str],
              cpus: Optional[set] = None) -> list[dict]:
    """`gentrain train PRESET` on the cached shards for max(marks) minutes of training (counted from
    its first step), with a checkpoint at every mark: at each mark SIGUSR1 stops the run (it saves
    and exits 75) and, before the last, `--resume auto` continues it (resume is bitwise, so the marks
    lie on one trajectory; each restart's start-up is not counted). One dict per mark."""
    from gentrain.checkpoint import checkpoints_dir, find_resume_checkpoint, step_of

    overrides = [f"data.shards={prep['cached']}", f"model.latent.autoencoder={prep['autoencoder']}",
                 f"model.latent.max_length={prep['max_length']}", "train.lr_schedule=constant",
                 f"train.max_steps={BIG_STEPS}", "train.sample_every=0", "train.checkpoint_every=0",
                 f"train.keep_last={len(marks) + 1}", "train.progress_bar=false", "train.log_every=1",
                 "run.trackers=[]", f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    metrics, out, trained = run_dir / "metrics.jsonl", [], 0.0
    for i, mark in enumerate(sorted(marks)):
        cmd = [sys.executable, "-m", "gentrain", "train", preset, *overrides, "--resume", "auto" if i else "none"]
        print(f"$ {' '.join(cmd[2:])}   # stopped at {mark:g} min of training", file=sys.stderr, flush=True)
        log = run_dir.parent / f"{run_dir.name}.{i}.log"
        size0 = metrics.stat().st_size if metrics.exists() else 0
        cpu0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_cpu_s(cpus), time.perf_counter()
        started = stopped = None
        with open(log, "w") as err:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=_env())
            while p.poll() is None:  # the clock runs from the segment's first logged step (train.log_every=1)
                now = time.perf_counter()
                if started is None and metrics.exists() and metrics.stat().st_size > size0:
                    started = now
                if started is not None and trained + now - started >= mark * 60:
                    p.send_signal(signal.SIGUSR1)
                    stopped = now
                    break
                time.sleep(0.2)
            p.wait(timeout=600)
        wall, busy = time.perf_counter() - t0, _busy_cpu_s(cpus) - busy0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        if p.returncode not in (0, 75):
            sys.exit(f"gentrain train failed ({p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
        if started is None or stopped is None:
            sys.exit(f"gentrain train ended (exit {p.returncode}) before its {mark:g} min were up; see {log}")
        ckpt = find_resume_checkpoint(checkpoints_dir(run_dir))
        if ckpt is None:
            sys.exit(f"{run_dir}: no checkpoint after the stop; see {log}")
        trained += stopped - started
        ncores = len(cpus) if cpus else os.cpu_count()
        prev = out[-1] if out else {"train_s": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "other_cpu_s": 0.0}
        other = prev["other_cpu_s"] + max(busy - cpu, 0.0)
        wall_all = prev["wall_s"] + wall
        out.append({"overrides": overrides, "minutes": mark, "budget_s": round(mark * 60, 1),
                    "startup_s": round(started - t0, 1), "train_s": round(trained, 1), "wall_s": round(wall_all, 1),
                    "steps": step_of(ckpt), "checkpoint": str(ckpt), "cpu_s": round(prev["cpu_s"] + cpu, 1),
                    "other_cpu_s": round(other, 1), "other_jobs_share": round(other / (wall_all * ncores), 3),
                    "exit": p.returncode, "segments": i + 1})
    return out


# ------------------------------------------------------------------------------------------ report

def _fmt(s: dict) -> str:
    return "  ".join(f"{s[k]:.3f}" if not (isinstance(s[k], float) and math.isnan(s[k])) else "  nan"
                     for k in (*ATTRS, "all"))


def _rank_key(row: dict) -> tuple:
    s = row["scores"]
    vals = [s[k] for k in ATTRS if not math.isnan(s[k])]   # position is NaN when no prompt names two objects
    return (-min(vals), -s["all"], -sum(vals) / len(vals))


def report(rows: list[dict], minutes: Optional[float]) -> str:
    if not rows:
        return "no rows"
    head = f"{'':24s}{'steps':>8s}  " + "  ".join(f"{k[:5]:>5s}" for k in (*ATTRS, "all"))
    lines = []
    budgets = sorted({r["minutes"] for r in rows})
    for b in budgets:
        group = sorted((r for r in rows if r["minutes"] == b), key=_rank_key)
        lines += [f"\n{b:g} min each (ranked by the worst attribute, then all, then the mean of the five):", head]
        for i, r in enumerate(group, 1):
            lines.append(f"{i}. {r['net']:<8s} {r['date'][:10]:<12s}{r['steps']:>8d}  {_fmt(r['scores'])}"
                         f"   N={r['scores']['n']}, other jobs {100 * r['other_jobs_share']:.0f}%")
        ref = group[0]["references"]
        for name in ("real", "autoencoder", "wrong", "noise"):
            if name in ref:
                lines.append(f"   {name:<21s}{'':8s}  {_fmt(ref[name])}")
    main = minutes if minutes is not None else max(budgets, key=lambda b: (len({r['net'] for r in rows if r['minutes'] == b}), b))
    at = [r for r in rows if r["minutes"] == main]
    if at:
        best = sorted(at, key=_rank_key)[0]["net"]
        curve = sorted((r for r in rows if r["net"] == best), key=lambda r: r["minutes"])
        lines += [f"\nquality against compute: {best} (best at {main:g} min)", f"{'minutes':>10s}{'':6s}" + head[24:]]
        for r in curve:
            lines.append(f"{r['minutes']:>10g}{'':6s}{r['steps']:>8d}  {_fmt(r['scores'])}")
        worst = min(ATTRS, key=lambda k: curve[-1]["scores"][k])
        lines.append(f"limiting attribute at {curve[-1]['minutes']:g} min: {worst} "
                     f"({curve[-1]['scores'][worst]:.3f}; target 0.9 on every attribute)")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", choices=sorted(NETS), help="the net to train and score (its preset: " +
                    ", ".join(f"{k} {v}" for k, v in NETS.items()) + ")")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall time of the training process (default 45)")
    ap.add_argument("--marks", default="", help="comma-separated shorter budgets in minutes (e.g. 7.5,15 with "
                    "--minutes 30): the same run is checkpointed at each (stop, then resume bitwise) and each is "
                    "scored as its own row, so half and twice a budget come from one trajectory")
    ap.add_argument("--cpus", default="", help="comma-separated CPU numbers to pin the bench, its training and "
                    "its scoring to (sched_setaffinity; OMP_NUM_THREADS defaults to their count), so that two "
                    "benches can run side by side on equal cores; other_jobs_share then counts those cores only")
    ap.add_argument("--n", type=int, default=500, help="held-out captions scored (default 500)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    ap.add_argument("--count", type=int, default=20000, help="shapes scenes in the training set (default 20000)")
    ap.add_argument("--vae-steps", type=int, default=2000, help="vae_shapes steps (default 2000, the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override of the run")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_shapes_quality",
                    help="data, autoencoder, cache and runs (shared between invocations)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shapes_quality.jsonl")
    ap.add_argument("--report", action="store_true", help="print the table of --out's rows and exit")
    ap.add_argument("--report-minutes", type=float, default=None, help="--report: the budget to rank at "
                    "(default: the one with the most nets, the longest on ties)")
    args = ap.parse_args()
    if args.report:
        print(report(read_rows(args.out), args.report_minutes))
        return 0
    if args.net is None:
        ap.error("--net is required (or --report)")
    if args.minutes <= 0 or args.n < 2:
        ap.error("--minutes must be > 0 and --n at least 2")
    marks = sorted({float(m) for m in args.marks.split(",") if m.strip()} | {args.minutes})
    if marks[0] <= 0:
        ap.error("--marks must be > 0")
    cpus = {int(c) for c in args.cpus.split(",") if c.strip()} or None
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by the training processes
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))

    import torch

    from gentrain.config import load_config

    preset = NETS[args.net]
    try:
        pcfg = load_config(preset, [])
    except Exception as e:  # a preset not on this branch yet
        sys.exit(f"--net {args.net}: preset {preset} does not load: {str(e).splitlines()[0]}")
    prep = prepare(args.work, args.count, args.vae_steps, int(pcfg.model.latent.max_length))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    base: dict = {"net": args.net, "preset": preset, "commit": commit + ("+dirty" if dirty else ""),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_start": os.getloadavg()[0],
                  "cpus": os.cpu_count(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "data": {k: prep[k] for k in ("count", "vae_steps", "max_length", "size")}}
    run_dir = args.work / "runs" / f"{args.net}_{args.minutes:g}min_{time.strftime('%Y%m%d%H%M%S')}"
    segments = train_for(preset, marks, prep, run_dir, args.set, cpus)

    from gentrain.train.runs import load_trained

    refs = None
    for seg in segments:
        row = {**base, **seg, "run": str(run_dir)}
        print(f"{args.net}: {row['steps']} steps in {row['train_s']:.0f} s; scoring {args.n} held-out captions "
              f"at {row['minutes']:g} min", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        cfg, objective, _ = load_trained(run_dir, Path(seg["checkpoint"]), use_ema=True)
        row["scores"] = score_objective(objective, cfg, args.n, args.guidance)
        if refs is None:
            refs = references(args.n, int(cfg.eval.seed), getattr(objective.space, "vae", None))
        row["references"] = refs
        row["score_seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(report([row], row["minutes"]))
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
