"""Issue 33's text-to-image half: the shapes checker's attributes against the post-hoc EMA length, on a
run of bench/shapes_quality.py, beside that run's fixed `train.ema_decay` EMA and its raw weights.

The shapes run (one JSON row of bench/results/shapes_quality.jsonl: preset, overrides, steps, run) was
trained with the preset's fixed EMA and stopped by the clock at `steps`. This bench trains its
**post-hoc twin**: the same preset and overrides (so the same seed, data, batch and constant lr), with
  train.ema=posthoc train.ema_decay=0 train.max_steps=STEPS train.posthoc_snapshot_every=STEPS/--snapshots
  eval.num_samples=N run.output_dir/run.name=the twin's folder
and nothing else changed (checked: the twin's resolved config against the run's config.yaml, key by
key, before training). Under a constant lr schedule the step count does not move the lr, and the EMA
never feeds back into training, so the twin's raw weights follow the fixed run's trajectory; the bench
compares the two step-STEPS checkpoints' raw weights (`model*.safetensors`) tensor by tensor and the
two metrics.jsonl loss traces, and records whether they are bitwise equal. Then:
  sweep        `gentrain ema TWIN --sweep LENGTHS --num-samples N`: each length reconstructed and scored
               by the family's own eval (eval.shapes: gentrain.eval.shapes.evaluate_text_to_image_shapes,
               N held-out captions of eval.seed, sampling seed eval.seed)
  fixed_ema    the shapes run's own EMA (its ema_decay, with the relative length of diffusers' EMAModel
               kernel after STEPS updates, bench/posthoc_ema.py's fixed_ema_sigma_rel), same eval
  raw_fixed    the shapes run's raw weights, same eval (raw_twin too when the weights are not bitwise equal)
The best length is ranked as bench/shapes_quality.py ranks nets: the worst attribute, then `all`.

  python bench/posthoc_ema_t2i.py --shapes-run runs/bench_shapes_quality/runs/unet_45min_2026...   # N=200
  python bench/posthoc_ema_t2i.py --shapes-run best     # the top row of --rows at its main budget
  python bench/posthoc_ema_t2i.py --shapes-run RUN --twin TWIN   # a twin trained already (e.g. beside the bench)
A run scored at several --marks budgets has a row per mark: the one with the most steps is twinned
(--steps picks another). The twin trains with the row's OMP_NUM_THREADS. Writes
bench/results/posthoc_ema_PRESET.json (or --out). The twin goes to --work/<run name>_s<STEPS>_posthoc_twin
(a twin already trained to STEPS there is reused).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))


def _sibling(name: str) -> Any:
    """bench/NAME.py as a module (bench/ is not a package; not put on sys.path, where its names could shadow others)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_posthoc, _shapes = _sibling("posthoc_ema"), _sibling("shapes_quality")
LENGTHS, finish_sweep, fixed_ema_sigma_rel, start_sweep = (_posthoc.LENGTHS, _posthoc.finish_sweep,
                                                           _posthoc.fixed_ema_sigma_rel, _posthoc.start_sweep)
ATTRS, _rank_key, read_rows = _shapes.ATTRS, _shapes._rank_key, _shapes.read_rows

# overrides the twin sets itself (a row's own values of these are dropped)
TWIN_KEYS = ("train.ema", "train.ema_decay", "train.max_steps", "train.posthoc_snapshot_every",
             "eval.num_samples", "run.output_dir", "run.name")
# keys a twin trained elsewhere (--twin) may also have changed: they do not move the trajectory
HARMLESS_KEYS = ("train.keep_last", "train.progress_bar", "train.checkpoint_every")
# lr schedules that do not depend on train.max_steps: the twin may stop its schedule at STEPS
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def pick_row(rows: list[dict], run: str, steps: Optional[int] = None) -> dict:
    """The row of `run` (a run folder: of its rows, one per --marks budget, the one at `steps`, else the
    one with the most steps; the newest on ties), or with run == "best" the top row at the budget with
    the most nets (the longest on ties), ranked as shapes_quality's report ranks."""
    if not rows:
        raise SystemExit("no rows of bench/shapes_quality.py to pick from (see --rows)")
    if run == "best":
        budget = max({r["minutes"] for r in rows}, key=lambda b: (len({r["net"] for r in rows if r["minutes"] == b}), b))
        return sorted((r for r in rows if r["minutes"] == budget), key=_rank_key)[0]
    want = Path(run).resolve()
    hits = [r for r in rows if Path(r["run"]).resolve() == want and steps in (None, r["steps"])]
    if not hits:
        raise SystemExit(f"--shapes-run {run}{f' --steps {steps}' if steps else ''}: no row of --rows names that "
                         f"run (rows name: {', '.join(sorted({Path(r['run']).name + ' at ' + str(r['steps']) for r in rows}))})")
    return max(reversed(hits), key=lambda r: r["steps"])


def twin_overrides(overrides: list[str], steps: int, twin_dir: Path, every: int, n: int) -> list[str]:
    """The shapes run's overrides with the twin's own (TWIN_KEYS) in place of any it set."""
    kept = [o for o in overrides if o.split("=", 1)[0].strip() not in TWIN_KEYS]
    return [*kept, "train.ema=posthoc", "train.ema_decay=0", f"train.max_steps={steps}",
            f"train.posthoc_snapshot_every={every}", f"eval.num_samples={n}",
            f"run.output_dir={twin_dir.parent}", f"run.name={twin_dir.name}"]


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: d}


def config_differences(fixed: dict, twin: dict, also: tuple = ()) -> list[str]:
    """Keys (flattened) where the twin's config differs from the fixed run's, beyond TWIN_KEYS, the
    posthoc profile keys (train.posthoc_*), which the twin sets, and `also`."""
    a, b = flat(fixed), flat(twin)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and k not in TWIN_KEYS and k not in also and not k.startswith("train.posthoc_")]


def rank_key(figures: dict) -> tuple:
    """shapes_quality's ranking (worst attribute, then all, then the mean) on eval/shapes_* figures."""
    return _rank_key({"scores": {k: figures[f"eval/shapes_{k}"] for k in (*ATTRS, "all")}})


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _resolved(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    from gentrain.config import to_yaml

    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))


def twin_done(twin_dir: Path, steps: int) -> bool:
    """A twin there reached `steps`: its checkpoint and EMA snapshot at that step exist."""
    from gentrain.checkpoint import SNAPSHOTS, checkpoints_dir, step_dir

    return ((step_dir(checkpoints_dir(twin_dir), steps) / "trainer_state.json").exists()
            and (twin_dir / SNAPSHOTS / f"step_{steps}.safetensors").exists())


def train_twin(preset: str, overrides: list[str], twin_dir: Path, steps: int, threads: Optional[str]) -> dict:
    """`gentrain train PRESET overrides` into twin_dir (OMP_NUM_THREADS `threads`, the shapes run's: the
    CPU kernels' sums depend on it), unless a twin there already reached `steps`."""
    if twin_done(twin_dir, steps):
        return {"reused": True}
    cmd = [sys.executable, "-m", "gentrain", "train", preset, *overrides, "--resume", "auto"]
    print(f"$ {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    twin_dir.parent.mkdir(parents=True, exist_ok=True)
    log = twin_dir.parent / f"{twin_dir.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                           env={**_env(), **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
    if p.returncode:
        sys.exit(f"twin training failed ({p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"train_seconds": round(time.perf_counter() - t0, 1), "log": str(log)}


def compare_raw(fixed_ckpt: Path, twin_ckpt: Path) -> dict:
    """The raw weights of the two checkpoints, file by file: max |difference| (None: keys differ)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in fixed_ckpt.glob("model*.safetensors"))
    out: dict[str, Optional[float]] = {}
    for name in files:
        a = load_file(str(fixed_ckpt / name))
        b = load_file(str(twin_ckpt / name)) if (twin_ckpt / name).exists() else {}
        out[name] = (max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0) for k in a)
                     if a.keys() == b.keys() else None)
        if out[name] == 0.0 and not all(torch.equal(a[k], b[k]) for k in a):
            out[name] = float("nan")   # equal in float64 but not bit for bit (e.g. -0.0 against 0.0)
    return {"bitwise_equal": bool(files) and all(v == 0.0 for v in out.values()), "max_abs_diff": out}


def first_loss_difference(fixed_run: Path, twin_run: Path) -> dict:
    """The first step whose logged losses differ between the two metrics.jsonl (both log every step)."""
    def losses(run: Path) -> dict[int, dict]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in rows if "step" in r}
    a, b = losses(fixed_run), losses(twin_run)
    common = sorted(s for s in set(a) & set(b) if a[s] and b[s])
    diff = next((s for s in common if a[s] != b[s]), None)
    return {"steps_compared": len(common), "first_differing_step": diff}


def evaluate_weights(run_dir: Path, checkpoint: Path, use_ema: bool, n: int) -> dict:
    from gentrain.eval.metrics import evaluate
    from gentrain.train.runs import load_trained

    cfg, objective, _ = load_trained(run_dir, checkpoint, use_ema=use_ema)
    cfg.eval.num_samples = n
    return {k: v for k, v in evaluate(objective, cfg).items() if k.startswith("eval/")}


def _fmt(d: dict) -> str:
    return "  ".join(f"{d[f'eval/shapes_{k}']:.3f}" for k in (*ATTRS, "all"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes-run", required=True, help="the shapes run (its folder, named by a row of --rows), or "
                    "'best': the top row at the budget with the most nets")
    ap.add_argument("--steps", type=int, default=None, help="of the run's rows (one per --marks budget), the one at "
                    "this step (default: the one with the most steps)")
    ap.add_argument("--twin", type=Path, default=None, help="a post-hoc twin trained already (to the row's steps, "
                    "train.ema=posthoc; checked against the run's config, which it may differ from in " +
                    ", ".join(HARMLESS_KEYS) + " too) instead of training one")
    ap.add_argument("--rows", type=Path, default=ROOT / "bench" / "results" / "shapes_quality.jsonl",
                    help="bench/shapes_quality.py's JSON lines (default bench/results/shapes_quality.jsonl)")
    ap.add_argument("--sweep-json", type=Path, default=None, help="the JSON printed by a finished `gentrain ema TWIN "
                    "--sweep LENGTHS --num-samples N` (same N) instead of running the sweep again")
    ap.add_argument("--n", type=int, default=200, help="held-out captions per scored weights (default 200)")
    ap.add_argument("--lengths", default=LENGTHS, help=f"sigma_rel values of the sweep (default {LENGTHS})")
    ap.add_argument("--snapshots", type=int, default=40, help="EMA snapshots over the run (default 40: "
                    "train.posthoc_snapshot_every = steps // 40)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_posthoc_ema", help="where the twin is trained")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/posthoc_ema_PRESET.json")
    args = ap.parse_args()
    if args.n < 2 or args.snapshots < 2:
        ap.error("--n and --snapshots must be at least 2")

    from gentrain.checkpoint import check_checkpoint, checkpoints_dir, step_dir
    from gentrain.config import load_config
    from gentrain.train.runs import load_run_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the sweep's process too
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row = pick_row(read_rows(args.rows), args.shapes_run, args.steps)
    preset, steps, fixed_dir = row["preset"], int(row["steps"]), Path(row["run"])
    last = Path(row.get("checkpoint") or step_dir(checkpoints_dir(fixed_dir), steps))
    if not last.is_dir() or check_checkpoint(last):
        sys.exit(f"{fixed_dir}: no valid checkpoint at step {steps} ({last}), the step its row names")
    fixed_cfg = load_run_config(fixed_dir)
    if fixed_cfg.train.lr_schedule not in STEP_FREE_SCHEDULES or fixed_cfg.train.ema != "fixed":
        sys.exit(f"{fixed_dir}: train.lr_schedule {fixed_cfg.train.lr_schedule}, train.ema {fixed_cfg.train.ema}; the twin "
                 f"needs a fixed-EMA run whose lr does not depend on max_steps ({', '.join(STEP_FREE_SCHEDULES)})")
    every = max(1, steps // args.snapshots)
    twin_dir = args.twin or args.work / f"{fixed_dir.name}_s{steps}_posthoc_twin"
    overrides = twin_overrides(row["overrides"], steps, twin_dir, every, args.n)
    if args.twin is not None:
        t = load_run_config(twin_dir).train
        if not twin_done(twin_dir, steps) or t.ema != "posthoc" or t.max_steps != steps:
            sys.exit(f"--twin {twin_dir}: not a train.ema=posthoc run with a checkpoint and an EMA snapshot at step {steps}")
        twin_cfg = load_run_config(twin_dir)
        every = t.posthoc_snapshot_every
    else:
        twin_cfg = load_config(preset, overrides)
    diffs = config_differences(_resolved(fixed_cfg), _resolved(twin_cfg), HARMLESS_KEYS if args.twin else ())
    if diffs:
        sys.exit(f"the twin's config would differ from {fixed_dir}/config.yaml beyond the EMA keys: {'; '.join(diffs)}")
    out_path = args.out or ROOT / "bench" / "results" / f"posthoc_ema_{preset}.json"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    decay, warmup = fixed_cfg.train.ema_decay, fixed_cfg.train.ema_warmup
    out: dict = {"preset": preset, "steps": steps, "fixed_run": str(fixed_dir), "twin_run": str(twin_dir),
                 "shapes_row": {k: row.get(k) for k in ("net", "minutes", "date", "commit", "steps", "scores")},
                 "twin_overrides": overrides, "snapshot_every": every, "n": args.n, "eval_seed": fixed_cfg.eval.seed,
                 "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_average_at_start": os.getloadavg()[0]}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1))

    print(f"{preset}: post-hoc twin of {fixed_dir} ({steps} steps, a snapshot every {every}) in {twin_dir}", flush=True)
    out["twin"] = ({"given": True, "snapshot_every": every} if args.twin else
                   train_twin(preset, overrides, twin_dir, steps, row.get("omp_num_threads")))
    twin_ckpt = step_dir(checkpoints_dir(twin_dir), steps)
    out["raw_weights"] = {**compare_raw(last, twin_ckpt), **first_loss_difference(fixed_dir, twin_dir)}
    if (twin_dir / "eval.json").exists():   # the twin's own final eval: its first profile, posthoc_sigma_rels[0]
        out["twin"]["final_eval"] = json.loads((twin_dir / "eval.json").read_text())
    print(f"  raw weights at step {steps}: bitwise equal {out['raw_weights']['bitwise_equal']} "
          f"({out['raw_weights']})", flush=True)
    save()

    t0 = time.perf_counter()
    if args.sweep_json:   # a sweep run already (its own process, as a user runs it)
        text = args.sweep_json.read_text()
        out["sweep"] = {**json.loads(text[text.index("{"):]), "from": str(args.sweep_json)}
        ns = {int(r["eval/shapes_n"]) for r in out["sweep"]["curve"]}
        if out["sweep"]["step"] != steps or ns != {args.n}:
            sys.exit(f"--sweep-json {args.sweep_json}: step {out['sweep']['step']}, N {sorted(ns)}; this bench needs step "
                     f"{steps}, N {args.n}")
    else:
        out["sweep"] = finish_sweep(start_sweep(twin_dir, args.lengths, args.n))   # gentrain ema TWIN --sweep (newest snapshot: steps)
    save()
    out["fixed_ema"] = {"ema_decay": decay, "ema_warmup": warmup,
                        "sigma_rel": round(fixed_ema_sigma_rel(decay, warmup, steps), 4) if decay > 0 else None,
                        **evaluate_weights(fixed_dir, last, True, args.n)}
    out["raw_fixed"] = evaluate_weights(fixed_dir, last, False, args.n)
    out["raw_twin"] = ({"same_as": "raw_fixed (bitwise equal weights)"} if out["raw_weights"]["bitwise_equal"]
                       else evaluate_weights(twin_dir, twin_ckpt, False, args.n))
    out["evals_seconds"] = round(time.perf_counter() - t0, 1)
    curve = out["sweep"]["curve"]
    best = min(curve, key=rank_key)
    out["best"] = {"by": "worst attribute, then all", "sigma_rel": best["sigma_rel"],
                   **{k: best[k] for k in best if k.startswith("eval/shapes_")}}
    save()

    print(f"\nshapes checker (N={args.n}, eval.seed {fixed_cfg.eval.seed}) against the post-hoc EMA length at step "
          f"{out['sweep']['step']} ({steps // every} snapshots):")
    print(f"  {'':22s}" + "  ".join(f"{k[:5]:>5s}" for k in (*ATTRS, "all")))
    for r in curve:
        res = max(r["residual"].values())
        print(f"  sigma_rel {r['sigma_rel']:<11g} {_fmt(r)}   residual {res:.2g}{'   <- best' if r is best else ''}")
    fe = out["fixed_ema"]
    print(f"  fixed {decay} (~{fe['sigma_rel']}) {_fmt(fe)}   the shapes run's own EMA")
    print(f"  raw weights{'':10s} {_fmt(out['raw_fixed'])}")
    print(f"best length: sigma_rel {best['sigma_rel']:g} (worst attribute {-rank_key(best)[0]:.3f}, all "
          f"{best['eval/shapes_all']:.3f}); the fixed ema_decay {decay} is sigma_rel ~{fe['sigma_rel']} at {steps} steps "
          f"(worst attribute {-rank_key(fe)[0]:.3f}, all {fe['eval/shapes_all']:.3f})")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
