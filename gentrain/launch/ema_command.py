"""`gentrain ema RUN --sigma-rel X [--step N] --out DIR`: a post-hoc EMA of any length; `--sweep X1,X2,...`:
the family's eval at each length, printed as a curve (docs/posthoc-ema.md)."""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

EPILOG = """examples:
  gentrain train flow_toy2d train.ema=posthoc train.ema_decay=0 train.posthoc_snapshot_every=100
  gentrain ema runs/flow_toy2d --sigma-rel 0.08 --out runs/flow_toy2d/ema_0.08
  gentrain sample runs/flow_toy2d --checkpoint runs/flow_toy2d/ema_0.08
  gentrain eval runs/flow_toy2d --checkpoint runs/flow_toy2d/ema_0.08
  gentrain ema runs/flow_toy2d --sweep 0.03,0.05,0.08,0.12,0.2 --num-samples 2000

The folder DIR is shaped like a checkpoint (the raw weights of step N's checkpoint, or of the newest
one when step N's was pruned; ema_NET.safetensors the reconstruction; posthoc_ema.json what was
done, with each net's kernel residual: 0 = exact). Keep it outside RUN/checkpoints/. --sweep
prints {"curve": [{"sigma_rel", "residual", eval figures...}, ...]} (with --out, each length's
folder is kept as DIR/sigma_rel_X).
"""


def add_ema(sub) -> None:
    p = sub.add_parser("ema", help="reconstruct an EMA of any length from a train.ema=posthoc run's snapshots",
                       description="Reconstruct the EMA of relative length --sigma-rel at snapshot step N from "
                                   "every power-function EMA profile stored up to N (EDM2's post-hoc EMA: least "
                                   "squares on the profiles' kernels), and write it as a checkpoint folder that "
                                   "`gentrain sample|eval|export RUN --checkpoint DIR` use like any EMA.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run directory trained with train.ema=posthoc")
    p.add_argument("--sigma-rel", type=float, default=None, metavar="X",
                   help="EMA length relative to the training time, in (0, 0.2887) (EDM2's sigma_rel; the run "
                        "stored train.posthoc_sigma_rels, e.g. 0.05 and 0.10)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="a snapshot step (RUN/ema_snapshots/step_N.safetensors; default: the newest)")
    p.add_argument("--out", type=Path, default=None, help="output folder (new or empty); optional with --sweep")
    p.add_argument("--sweep", default=None, metavar="X1,X2,...",
                   help="instead of --sigma-rel: reconstruct each length, evaluate it as `gentrain eval` does and "
                        "print the curve as JSON")
    p.add_argument("--num-samples", type=int, default=None, help="--sweep: override eval.num_samples")
    p.set_defaults(func=cmd_ema)


def _lengths(args) -> list[float]:
    from gentrain.errors import GentrainError
    from gentrain.maths.posthoc_ema import SIGMA_REL_MAX

    if (args.sigma_rel is None) == (args.sweep is None):
        raise GentrainError("give one of --sigma-rel X (with --out DIR) or --sweep X1,X2,...")
    if args.sweep is None:
        if args.out is None:
            raise GentrainError("--sigma-rel needs --out DIR (the folder the EMA is written to)")
        return [args.sigma_rel]
    try:
        lengths = [float(x) for x in args.sweep.split(",")]
    except ValueError:
        raise GentrainError(f"--sweep {args.sweep!r}: expected numbers separated by commas, e.g. 0.05,0.1,0.15") from None
    if len(set(lengths)) != len(lengths) or not all(0 < x < SIGMA_REL_MAX for x in lengths):
        raise GentrainError(f"--sweep {args.sweep!r}: the lengths must be distinct, each in (0, {SIGMA_REL_MAX:.4f})")
    if args.out is not None and args.out.is_dir() and any(args.out.iterdir()):
        raise GentrainError(f"--out {args.out}: already exists and is not empty; choose another folder")
    return lengths


def _sweep(args, lengths: list[float]) -> int:
    import tempfile

    from gentrain.eval.metrics import evaluate
    from gentrain.train.ema_reconstruct import write_reconstruction
    from gentrain.train.runs import load_trained

    curve, step = [], None
    with tempfile.TemporaryDirectory(prefix="gentrain-ema-sweep-") as tmp:
        for x in lengths:
            folder = (args.out or Path(tmp)) / f"sigma_rel_{x:g}"
            summary = write_reconstruction(args.run, folder, x, args.step)
            cfg, objective, _ = load_trained(args.run, folder)
            if args.num_samples:
                cfg.eval.num_samples = args.num_samples
            curve.append({"sigma_rel": x, "residual": summary["residual"], **evaluate(objective, cfg)})
            step = summary["step"]
    print(json.dumps({"run": str(args.run), "step": step, "curve": curve}, indent=1))
    return 0


def cmd_ema(args) -> int:
    from gentrain.outputs import check_out, removed_on_failure
    from gentrain.train.ema_reconstruct import write_reconstruction

    lengths = _lengths(args)
    if args.out is not None:
        check_out(args.out)
    if args.sweep is not None:
        with removed_on_failure(args.out, new_entries=True) if args.out is not None else nullcontext():
            return _sweep(args, lengths)
    with removed_on_failure(args.out):
        summary = write_reconstruction(args.run, args.out, args.sigma_rel, args.step)
    print(json.dumps({"out": str(args.out), **summary}, indent=1))
    return 0
