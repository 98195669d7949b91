"""Atomic checkpoints: write to a temp dir, manifest (sizes + sha256) last, then rename.

A checkpoint directory ``step_N`` is valid only if its ``manifest.json`` lists every file with the
right size and hash; a kill during a save leaves a ``.tmp-step_N`` directory that is never
mistaken for a checkpoint. Nothing here unpickles: model weights and EMA are safetensors, RNG
and data positions JSON/safetensors, and accelerate's own optimizer files load with
``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gentrain.errors import GentrainError

MANIFEST = "manifest.json"
# a file that gets one line "STEP PATH" per checkpoint completed (gentrain.sbatch requeues only after one)
SAVED_FILE_ENV = "GENTRAIN_SAVED_FILE"

# ---- the names of a run's checkpoint files: spelled here only --------------------------------------
# RUN/checkpoints/step_N/ holds, besides the manifest:
#   model.safetensors, model_1.safetensors, ...   each net's whole weights, in the family's net order
#   ema_NET.safetensors                           each EMA whole (main rank)
#   trainer_state.json                            step, images, EMA meta, schedulers, backend kind (main rank)
#   rng_rankR.{safetensors,json}, data_rankR.json, objective_rankR.safetensors   per rank
#   optimizer.bin, optimizer_1.bin, ...           accelerate's optimizer files, one per phase (DDP, FSDP2)
#   optimizer_NET.safetensors, deepspeed/NET/     DeepSpeed: the whole optimizer state, its engine's files
#   fsdp2/NET/, fsdp2/optimizer_I{/,.json}       FSDP2: each rank's shards through DCP (safetensors, JSON)
CHECKPOINTS = "checkpoints"             # the folder of a run's step_N checkpoints
TRAINER_STATE = "trainer_state.json"
EMA_FILES = "ema_*.safetensors"         # a glob: whether a checkpoint keeps EMA weights
DEEPSPEED = "deepspeed"                 # DeepSpeed's engine checkpoints, one folder per engine (its tag)
DEEPSPEED_LATEST = "latest"             # DeepSpeed's tag file, read by its own tools (zero_to_fp32)
FSDP2_SHARDS = "fsdp2"                  # FSDP2's per-rank DCP shard files (distributed/fsdp2_dcp.py)
BACKEND_KINDS = ("ddp", "deepspeed", "fsdp2")   # trainer_state.json's "backend": each resumes under any backend


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step}"


def model_file(ckpt_dir: Path, i: int) -> Path:
    """The whole weights of the family's `i`-th net (accelerate's names for a DDP run's models)."""
    return ckpt_dir / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")


def ema_file(ckpt_dir: Path, net: str) -> Path:
    return ckpt_dir / f"ema_{net}.safetensors"


def posthoc_file(ckpt_dir: Path, net: str) -> Path:
    """train.ema=posthoc: the profiles after the first (the first is ema_file's)."""
    return ckpt_dir / f"posthoc_{net}.safetensors"


SNAPSHOTS = "ema_snapshots"             # RUN/ema_snapshots/step_N.safetensors: post-hoc EMA, never pruned


def snapshot_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"step_{step}.safetensors"


def optimizer_file(ckpt_dir: Path, i: int) -> Path:
    """The `i`-th phase's whole optimizer state (accelerate's names; DDP and FSDP2 write it)."""
    return ckpt_dir / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin")


def net_optimizer_file(ckpt_dir: Path, net: str) -> Path:
    """Net `net`'s whole optimizer state by parameter name (DeepSpeed: what resumes on another process count)."""
    return ckpt_dir / f"optimizer_{net}.safetensors"


def rng_prefix(ckpt_dir: Path, rank: int) -> Path:
    """Rank `rank`'s RNG state: PREFIX.safetensors (torch, CUDA) and PREFIX.json (Python, NumPy)."""
    return ckpt_dir / f"rng_rank{rank}"


def data_file(ckpt_dir: Path, rank: int) -> Path:
    """Rank `rank`'s data position (the stream's state dict)."""
    return ckpt_dir / f"data_rank{rank}.json"


def objective_file(ckpt_dir: Path, rank: int) -> Path:
    """Rank `rank`'s family state (e.g. an image pool), when the family keeps one."""
    return ckpt_dir / f"objective_rank{rank}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: Path) -> None:
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {}
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        entries[str(p.relative_to(ckpt_dir))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = ckpt_dir / (MANIFEST + ".part")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(ckpt_dir / MANIFEST)


def check_checkpoint(ckpt_dir: Path) -> str | None:
    """None if the checkpoint matches its manifest, else the reason it does not."""
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"manifest.json is unreadable ({e})"
    for name, meta in entries.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {meta['size']}"
        if _sha256(p) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """step_N directories, newest first (temp dirs of interrupted saves are not listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def find_resume_checkpoint(ckpt_root: Path, log=_warn) -> Path | None:
    """The newest valid checkpoint; invalid ones are reported by path (stderr) and skipped."""
    for ckpt in list_checkpoints(ckpt_root):
        problem = check_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"gentrain: skipping invalid checkpoint {ckpt}: {problem}")
    return None


def tmp_dir_for(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-step_{step}"


def finalize(tmp: Path, ckpt_root: Path, step: int, keep_last: int) -> Path:
    """Manifest last, atomic rename, then prune to the newest keep_last checkpoints (main process)."""
    write_manifest(tmp)
    final = step_dir(ckpt_root, step)
    if final.exists():  # a re-save of the same step (e.g. the final step after a resume)
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    if os.environ.get(SAVED_FILE_ENV):
        with open(os.environ[SAVED_FILE_ENV], "a") as f:
            f.write(f"{step} {final}\n")
    return final


# --- RNG state, our own files: accelerate's loader swallows RNG errors, we must not ---------

def save_rng(path_prefix: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    save_file(tensors, f"{path_prefix}.safetensors")
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    Path(f"{path_prefix}.json").write_text(json.dumps(state))


def load_rng(path_prefix: Path) -> None:
    try:
        tensors = load_file(f"{path_prefix}.safetensors")
        state = json.loads(Path(f"{path_prefix}.json").read_text())
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except Exception as e:  # noqa: BLE001 - any failure here must stop the resume
        raise GentrainError(f"could not restore the RNG state from {path_prefix}.*: {e}") from None


def save_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GentrainError(f"could not read {path}: {e}") from None


def check_keys(path: Path, found: set[str], expected: Any) -> None:
    """A weights file's tensors must be exactly the expected names (one line naming the first odd one)."""
    expected = set(expected)
    if found != expected:
        odd = sorted(expected - found)[:1] or sorted(found - expected)[:1]
        what = "lacks" if expected - found else "has an unexpected"
        raise GentrainError(f"{path} {what} tensor {odd[0]!r} ({len(found)} tensors, {len(expected)} expected): "
                            "it was written for another net or adapter configuration")
