"""Run directories: where a run lives, resuming it, and loading trained nets back from it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gentrain.errors import GentrainError
from gentrain.config import Config, load_config, to_yaml
from gentrain import checkpoint as ckpt

# keys that may change when a run is resumed (cadence, length, workers); anything else must match
RESUMABLE_CHANGES = {"train.max_steps", "train.log_every", "train.sample_every", "train.checkpoint_every",
                     "train.keep_last", "train.progress_bar", "train.nan_patience", "data.num_workers",
                     "train.process_group_timeout_s", "eval.num_samples", "eval.fd_seeds",
                     "train.posthoc_snapshot_every",   # snapshots are self-describing (train/ema.py)
                     # elastic resume on another process count, at the same global batch (checked by the Trainer)
                     "train.num_processes", "train.batch_size"}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_run_dir(cfg: Config, resume: str) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from, checked without writing anything (what
    `--dry-run` runs too).

    resume: "none" (a new run: the directory must not hold one already), "auto" (the newest valid
    checkpoint, or a fresh start if there is none) or a checkpoint path; a resumed run's saved
    config must match but for RESUMABLE_CHANGES.
    """
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    saved = run_dir / "config.yaml"
    resume_from: Path | None = None
    if resume == "none":
        if saved.exists() or ckpt.checkpoints_dir(run_dir).exists():
            raise GentrainError(f"run directory {run_dir} already holds a run; pass --resume auto to continue it "
                                f"or set run.name to start a new one")
    elif resume == "auto":
        resume_from = ckpt.find_resume_checkpoint(ckpt.checkpoints_dir(run_dir))
    else:
        resume_from = Path(resume)
        if not resume_from.is_dir():
            raise GentrainError(f"--resume {resume}: no such checkpoint directory")
        problem = ckpt.check_checkpoint(resume_from)
        if problem:
            raise GentrainError(f"--resume {resume}: checkpoint is invalid: {problem}")
    if resume_from is not None and saved.exists():
        # the saved config read through today's schema: a key added since the run was saved compares
        # as its default (so a run saved by older code resumes), a changed value is still refused
        old = _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(load_run_config(run_dir)))))
        new = _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES:
                raise GentrainError(f"config key {key!r} differs from the run being resumed ({old.get(key)!r} -> "
                                    f"{new.get(key)!r}); only {', '.join(sorted(RESUMABLE_CHANGES))} may change")
    return run_dir, resume_from


def prepare_run_dir(cfg: Config, resume: str, *, is_main: bool = True) -> tuple[Path, Path | None]:
    """:func:`check_run_dir`, then create (or reopen) the run directory. Nothing existing is
    overwritten except config.yaml of a resumed run, rewritten with the allowed changes (by
    :func:`write_run_config`, once every rank has passed the read-only checks)."""
    run_dir, resume_from = check_run_dir(cfg, resume)
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise GentrainError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None
    return run_dir, resume_from


def write_run_config(cfg: Config, run_dir: Path) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(to_yaml(cfg))


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise GentrainError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(str(path), check_unused=False)   # a run saved before keys were checked still loads


def load_trained(run_dir: Path, checkpoint: Path | None = None, *, use_ema: bool = True,
                 device: str = "cpu") -> tuple[Config, Any, Path]:
    """Rebuild a run's objective with trained weights (EMA where kept) from its newest valid checkpoint."""
    from safetensors.torch import load_file

    from gentrain.objectives import build_objective

    cfg = load_run_config(run_dir)
    path = checkpoint or ckpt.find_resume_checkpoint(ckpt.checkpoints_dir(run_dir))
    if path is None:
        raise GentrainError(f"{run_dir} has no valid checkpoint to load")
    problem = ckpt.check_checkpoint(path)
    if problem:
        raise GentrainError(f"checkpoint {path} is invalid: {problem}")
    state = ckpt.load_json(path / ckpt.TRAINER_STATE)
    objective = build_objective(cfg)
    for i, name in enumerate(state["nets"]):
        ema_file = ckpt.ema_file(path, name)
        weights = ema_file if use_ema and ema_file.exists() else ckpt.model_file(path, i)
        sd = load_file(str(weights))
        net = objective.nets[name]
        if ema_file == weights:  # EMA files hold parameters only; keep buffers from the model file
            full = load_file(str(ckpt.model_file(path, i)))
            sd = {**full, **sd}
        if name in objective.partial_nets:  # adapters only: the frozen base came from its source
            from gentrain.checkpoint import check_keys

            check_keys(weights, set(sd), [k for k, p in net.named_parameters() if p.requires_grad])
            net.load_state_dict(sd, strict=False)
        else:
            net.load_state_dict(sd)
        net.eval()
    objective.to(device)
    return cfg, objective, path
