"""The Trainer's checkpoints: everything a resumed run needs to go on as if never stopped.

A checkpoint (files named in gentrain/checkpoint.py) holds the backend's model and optimizer files,
each rank's RNG state, data position and family state, and, from the main rank, each EMA whole and
trainer_state.json (step, images seen, EMA bookkeeping, LR schedules, backend kind, global batch).
It is written into a temporary folder by every rank and made valid by the manifest the main rank
writes last (checkpoint.finalize). Loading checks the manifest first: nothing is read from a
checkpoint gentrain did not finish writing.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file

from gentrain import checkpoint as ckpt
from gentrain.distributed.core import barrier
from gentrain.errors import GentrainError
from gentrain.train.ema import load_profiles, save_profiles

if TYPE_CHECKING:
    from gentrain.train.loop import Trainer


def global_batch(tr: Trainer) -> int:
    return tr.cfg.train.batch_size * tr.cfg.train.grad_accum * tr.acc.num_processes


def save_checkpoint(tr: Trainer) -> None:
    """Every rank: checkpoint step_{tr.step} of the run, atomically (manifest last, then renamed)."""
    root = ckpt.checkpoints_dir(tr.run_dir)
    tmp = ckpt.tmp_dir_for(root, tr.step)
    if tr.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(tr.acc)
    tr.backend.save(tmp)
    r = tr.acc.process_index
    ckpt.save_rng(ckpt.rng_prefix(tmp, r))
    ckpt.save_json(ckpt.data_file(tmp, r), tr.stream.state_dict())
    family_state = tr.objective.state_dict()
    if family_state:
        save_file({k: v.detach().cpu().contiguous() for k, v in family_state.items()}, str(ckpt.objective_file(tmp, r)))
    emas = tr.full_emas()
    save_profiles(tr.emas, tr.backend, tmp, tr.main)   # posthoc: the other profiles
    if tr.main:
        ema_meta = {}
        for n, ema in tr.emas.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in emas[n].items()}, str(ckpt.ema_file(tmp, n)))
            ema_meta[n] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        ckpt.save_json(tmp / ckpt.TRAINER_STATE, {
            "step": tr.step, "images": tr.images, "nan_total": tr.nan_total,
            "num_processes": tr.acc.num_processes, "ema": ema_meta, "nets": list(tr.objective.nets),
            "backend": tr.backend.kind, "global_batch": global_batch(tr),
            "schedulers": [s.state_dict() for s in tr.schedulers],
        })
    barrier(tr.acc)
    if tr.main:
        ckpt.finalize(tmp, root, tr.step, tr.cfg.train.keep_last)
    barrier(tr.acc)


def _data_position(tr: Trainer, path: Path, saved_n: int) -> dict:
    """This rank's data position; from every saved rank's when the process count or the
    worker count changed (elastic resume: the rest of the epoch exactly once, elastic.py)."""
    r = tr.acc.process_index
    remap = getattr(tr.stream, "remapped_state", None)
    if remap is None:
        if saved_n != tr.acc.num_processes:
            raise GentrainError(f"checkpoint {path} was written by {saved_n} process(es); this run has "
                                f"{tr.acc.num_processes}, and data.source={tr.cfg.data.source!r} cannot remap "
                                "its position: resume with the same process count")
        return ckpt.load_json(ckpt.data_file(path, r))
    return remap([ckpt.load_json(ckpt.data_file(path, i)) for i in range(saved_n)])


def load_checkpoint(tr: Trainer, path: Path) -> None:
    """Every rank: the run's state from checkpoint `path`, refused in one line when it does not fit
    this launch (invalid, another backend, another global batch, a missing EMA)."""
    problem = ckpt.check_checkpoint(path)
    if problem:
        raise GentrainError(f"checkpoint {path} is invalid: {problem}")
    state = ckpt.load_json(path / ckpt.TRAINER_STATE)
    r, saved_n = tr.acc.process_index, state["num_processes"]
    kind = state.get("backend", "ddp")
    if kind not in ckpt.BACKEND_KINDS:  # any known kind resumes under any backend (distributed/portable.py)
        raise GentrainError(f"checkpoint {path} was written by a {kind!r} backend, which this gentrain does not know "
                            f"(it knows {', '.join(ckpt.BACKEND_KINDS)})")
    if state.get("global_batch", global_batch(tr)) != global_batch(tr):
        t = tr.cfg.train
        raise GentrainError(f"checkpoint {path} trained at a global batch of {state['global_batch']}; this run has "
                            f"{global_batch(tr)} (train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum} "
                            f"x {tr.acc.num_processes} process(es)): set train.batch_size to keep it")
    tr.backend.load(path, state)  # natively (the kinds in backend.reads), else from the whole files: any count
    tr.stream.load_state_dict(_data_position(tr, path, saved_n))
    for s, sd in zip(tr.schedulers, state["schedulers"]):
        s.load_state_dict(sd)
        for group, lr in zip(s.optimizer.param_groups, s.get_last_lr()):
            group["lr"] = lr   # what the saved optimizer held (an elastic DeepSpeed load restores no groups)
    family_file = ckpt.objective_file(path, min(r, saved_n - 1))
    tr.objective.load_state_dict(load_file(str(family_file), device=str(tr.acc.device))
                                 if family_file.exists() else {})
    for n, ema in tr.emas.items():
        if n not in state["ema"]:
            raise GentrainError(f"checkpoint {path} has no EMA for net {n!r} (was train.ema_decay 0 then?)")
        full = load_file(str(ckpt.ema_file(path, n)))
        ema.load_state_dict({**state["ema"][n], "shadow_params": tr.backend.local_ema(n, full)})
        ema.to(tr.acc.device)
    load_profiles(tr.emas, tr.backend, path, tr.acc.device)
    tr.step, tr.images, tr.nan_total = state["step"], state["images"], state["nan_total"]
    ckpt.load_rng(ckpt.rng_prefix(path, min(r, saved_n - 1)))  # every rank runs the same stream (BatchRNG)
