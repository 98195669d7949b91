"""`gentrain ema`: an EMA of any length, after training, from a posthoc run's snapshots (train/ema.py).

The EMA of relative length sigma_rel at snapshot step N is the least-squares combination of every
stored profile of every snapshot up to N (gentrain/maths/posthoc_ema.py), per net, in float64. It
is written as a checkpoint-shaped folder (the run's raw weights from a checkpoint, ``ema_NET``
replaced by the reconstruction, a manifest), so ``gentrain sample|eval|export RUN --checkpoint
DIR`` use it as they use any EMA.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gentrain import checkpoint as ckpt
from gentrain.errors import GentrainError
from gentrain.maths.posthoc_ema import SIGMA_REL_MAX, reconstruction_coefficients, residual, sigma_rel_to_gamma


def list_snapshots(run_dir: Path) -> dict[int, Path]:
    """Snapshot step -> file, oldest first (temp files of interrupted writes are not listed)."""
    root = Path(run_dir) / ckpt.SNAPSHOTS
    found = root.glob("step_*.safetensors") if root.is_dir() else ()
    steps = {int(p.name[5:-12]): p for p in found if p.name[5:-12].isdigit()}
    return dict(sorted(steps.items()))


def _meta(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), "pt") as f:
            m = f.metadata() or {}
        return {"step": int(m["step"]), "sigma_rels": json.loads(m["sigma_rels"]), "gammas": json.loads(m["gammas"]),
                "t": json.loads(m["t"])}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise GentrainError(f"EMA snapshot {path} is unreadable ({str(e).splitlines()[0][:200]})") from None


def reconstruct(run_dir: Path, sigma_rel: float, step: int | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Net -> reconstructed EMA weights (float32, with the net's buffers at step N), and a summary
    (step, sigma_rel, the snapshots used, each net's kernel residual)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise GentrainError(f"--sigma-rel {sigma_rel}: must be in (0, {SIGMA_REL_MAX:.4f}) (EDM2's relative EMA length)")
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise GentrainError(f"{run_dir} has no EMA snapshots ({ckpt.SNAPSHOTS}/step_N.safetensors): train it with "
                            "train.ema=posthoc (and train.ema_decay=0)")
    step = max(snaps) if step is None else step
    if step not in snaps:
        raise GentrainError(f"--step {step}: no EMA snapshot at that step; snapshots: "
                            f"{', '.join(map(str, snaps))}")
    metas = [_meta(p) for s, p in snaps.items() if s <= step]
    if any(m["sigma_rels"] != metas[-1]["sigma_rels"] for m in metas):
        raise GentrainError(f"the EMA snapshots of {run_dir} hold different profiles (train.posthoc_sigma_rels "
                            "changed during the run); reconstruct from one run's snapshots")
    gamma_r = sigma_rel_to_gamma(sigma_rel)
    out: dict[str, dict[str, torch.Tensor]] = {}
    summary: dict[str, Any] = {"step": step, "sigma_rel": sigma_rel, "snapshots": len(metas),
                               "stored_sigma_rels": metas[-1]["sigma_rels"], "residual": {}}
    last = snaps[step]
    for net, t_r in metas[-1]["t"].items():
        if t_r == 0:
            raise GentrainError(f"net {net!r} had not trained yet at step {step}: nothing to average")
        used = [(m, i) for m in metas for i in range(len(m["gammas"])) if m["t"][net] > 0]
        ts = [m["t"][net] for m, _ in used]
        gammas = [m["gammas"][i] for m, i in used]
        x = reconstruction_coefficients(ts, gammas, t_r, gamma_r)
        summary["residual"][net] = residual(ts, gammas, t_r, gamma_r, x)
        acc: dict[str, torch.Tensor] = {}
        for (m, i), c in zip(used, x):
            prefix = f"{net}/{i}/"
            with safe_open(str(snaps[m["step"]]), "pt") as f:
                for k in f.keys():
                    if k.startswith(prefix):
                        v = f.get_tensor(k).double() * float(c)
                        name = k[len(prefix):]
                        acc[name] = acc[name] + v if name in acc else v
        weights = {k: v.float() for k, v in acc.items()}
        with safe_open(str(last), "pt") as f:   # buffers (BatchNorm statistics) as they were at step N
            buffers = {k.split("/", 2)[2]: k for k in f.keys() if k.startswith(f"{net}/buffers/")}
            saved = _state_keys(run_dir, step, net) if buffers else set()
            # only the buffers the net saves (snapshots before 2026-12-08 also held non-persistent
            # ones, e.g. PixArt's pos_embed, which load_state_dict refuses)
            weights.update({name: f.get_tensor(k) for name, k in buffers.items() if name in saved})
        out[net] = weights
    return out, summary


def _state_keys(run_dir: Path, step: int, net: str) -> set[str]:
    """The keys of `net`'s state dict as its checkpoint saved them (the base checkpoint's model file)."""
    base = _base_checkpoint(run_dir, step)
    names = ckpt.load_json(base / ckpt.TRAINER_STATE)["nets"]
    with safe_open(str(ckpt.model_file(base, names.index(net))), "pt") as f:
        return set(f.keys())


def _base_checkpoint(run_dir: Path, step: int) -> Path:
    """The checkpoint whose raw weights go beside the reconstruction: step N's if kept, else the newest."""
    root = Path(run_dir) / "checkpoints"
    exact = root / f"step_{step}"
    if exact.is_dir() and ckpt.check_checkpoint(exact) is None:
        return exact
    newest = ckpt.find_resume_checkpoint(root)
    if newest is None:
        raise GentrainError(f"{run_dir} has no valid checkpoint to take the raw weights from")
    return newest


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_reconstruction(run_dir: Path, out: Path, sigma_rel: float, step: int | None = None) -> dict:
    """`out`: a checkpoint-shaped folder with the EMA of length sigma_rel at step N as ``ema_NET``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GentrainError(f"--out {out}: already exists and is not empty; choose another folder")
    weights, summary = reconstruct(run_dir, sigma_rel, step)
    base = _base_checkpoint(run_dir, summary["step"])
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.glob("model*.safetensors")) + [base / ckpt.TRAINER_STATE]:
        _link_or_copy(f, out / f.name)
    for net, sd in weights.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt.ema_file(out, net)))
    summary = {**summary, "run": str(run_dir), "raw_weights_from": str(base)}
    ckpt.save_json(out / "posthoc_ema.json", summary)
    ckpt.write_manifest(out)
    return summary
