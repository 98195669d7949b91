"""`gentrain ema RUN --sigma-rel X [--step N] --out DIR`: a post-hoc EMA of any length (docs/posthoc-ema.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """examples:
  gentrain train flow_toy2d train.ema=posthoc train.ema_decay=0 train.posthoc_snapshot_every=100
  gentrain ema runs/flow_toy2d --sigma-rel 0.08 --out runs/flow_toy2d/ema_0.08
  gentrain sample runs/flow_toy2d --checkpoint runs/flow_toy2d/ema_0.08
  gentrain eval runs/flow_toy2d --checkpoint runs/flow_toy2d/ema_0.08

The folder DIR is shaped like a checkpoint (the raw weights of step N's checkpoint, or of the newest
one when step N's was pruned; ema_NET.safetensors the reconstruction; posthoc_ema.json what was
done, with each net's kernel residual: 0 = exact). Keep it outside RUN/checkpoints/.
"""


def add_ema(sub) -> None:
    p = sub.add_parser("ema", help="reconstruct an EMA of any length from a train.ema=posthoc run's snapshots",
                       description="Reconstruct the EMA of relative length --sigma-rel at snapshot step N from "
                                   "every power-function EMA profile stored up to N (EDM2's post-hoc EMA: least "
                                   "squares on the profiles' kernels), and write it as a checkpoint folder that "
                                   "`gentrain sample|eval|export RUN --checkpoint DIR` use like any EMA.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run directory trained with train.ema=posthoc")
    p.add_argument("--sigma-rel", type=float, required=True, metavar="X",
                   help="EMA length relative to the training time, in (0, 0.2887) (EDM2's sigma_rel; the run "
                        "stored train.posthoc_sigma_rels, e.g. 0.05 and 0.10)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="a snapshot step (RUN/ema_snapshots/step_N.safetensors; default: the newest)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    p.set_defaults(func=cmd_ema)


def cmd_ema(args) -> int:
    from gentrain.outputs import check_out, removed_on_failure
    from gentrain.train.ema_reconstruct import write_reconstruction

    check_out(args.out)
    with removed_on_failure(args.out):
        summary = write_reconstruction(args.run, args.out, args.sigma_rel, args.step)
    print(json.dumps({"out": str(args.out), **summary}, indent=1))
    return 0
