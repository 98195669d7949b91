"""Export a trained run: diffusers folders for diffusers nets, plain safetensors otherwise."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from gentrain import checkpoint as ckpt
from gentrain.errors import GentrainError
from gentrain.config import to_yaml
from gentrain.train.runs import load_trained


def export_run(run_dir: Path, out: Path, *, checkpoint: Path | None = None) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GentrainError(f"export directory {out} already exists and is not empty; choose another --out")
    cfg, objective, path = load_trained(run_dir, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if objective.exports_folder:
        # families with a diffusers format write it themselves, measuring latents on the data
        from gentrain.eval.heldout import heldout_batches

        cfg_train = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, shards=None, num_samples=1024))
        info = objective.export(out, cfg, heldout_batches(cfg_train))
    else:
        for name, net in objective.nets.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                      str(out / f"{name}.safetensors"))
        (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "gentrain_export.json").write_text(json.dumps(
        {"family": cfg.model.family, "run": str(run_dir), "checkpoint": str(path),
         "nets": list(objective.nets), "weights": "ema" if any(path.glob(ckpt.EMA_FILES)) else "raw", **info},
        indent=1))
    return out
