"""The Trainer's EMA: diffusers' EMAModel at a fixed decay (train.ema=fixed), or post-hoc EMA
profiles (train.ema=posthoc, docs/posthoc-ema.md).

Post-hoc: each EMA net keeps one power-function profile per ``train.posthoc_sigma_rels`` (maths in
gentrain/maths/posthoc_ema.py), updated after every step of its phase on the tensors the backend's
EMA follows (DDP: the whole parameters; DeepSpeed ZeRO: this rank's share of the fp32 master;
FSDP2: the local shard), as the fixed EMA is. The first profile stands in for the EMA while
training (previews, the final eval, ``ema_NET.safetensors`` in checkpoints); the others are saved
beside it (``posthoc_NET.safetensors``) so a resume is bitwise. Every
``train.posthoc_snapshot_every`` steps, and at train.max_steps, all profiles are gathered whole and
written to ``RUN/ema_snapshots/step_N.safetensors``: apart from checkpoints/, so train.keep_last
never prunes them. `gentrain ema` reconstructs an EMA of any length from them (ema_reconstruct.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from gentrain import checkpoint as ckpt
from gentrain.errors import GentrainError
from gentrain.maths.posthoc_ema import power_beta, sigma_rel_to_gamma



class PowerEMA:
    """One net's power-function EMA profiles (EDM2), with the interface the Trainer uses of
    diffusers' EMAModel: step(params), shadow_params (the first profile), state_dict, load_state_dict, to."""

    def __init__(self, params: Iterable[Tensor], sigma_rels: list[float]):
        params = list(params)
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = [[p.detach().float().clone() for p in params] for _ in self.gammas]
        self.t = 0   # updates so far; update t gives step t's weights the kernel's mass on (t - 1, t]

    @property
    def shadow_params(self) -> list[Tensor]:
        return self.profiles[0]

    @torch.no_grad()
    def step(self, params: Iterable[Tensor]) -> None:
        params = [p.detach() for p in params]
        self.t += 1
        for gamma, shadow in zip(self.gammas, self.profiles):
            torch._foreach_lerp_(shadow, params, 1.0 - power_beta(self.t, gamma))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "posthoc", "t": self.t, "sigma_rels": self.sigma_rels, "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "posthoc" or state.get("sigma_rels") != self.sigma_rels:
            raise GentrainError(f"the checkpoint's EMA ({state.get('kind', 'fixed')}, sigma_rels "
                                f"{state.get('sigma_rels')}) is not this run's posthoc EMA {self.sigma_rels}")
        self.t = int(state["t"])
        self.profiles[0] = [s.detach().float().clone() for s in state["shadow_params"]]

    def to(self, device: Any) -> None:
        self.profiles = [[s.to(device) for s in shadow] for shadow in self.profiles]


def build_emas(t: Any, ema_nets: Iterable[str], backend: Any) -> dict[str, Any]:
    """Net name -> its EMA (fixed: diffusers' EMAModel when train.ema_decay > 0; posthoc: PowerEMA)."""
    if t.ema == "posthoc":
        return {n: PowerEMA(backend.ema_params(n), t.posthoc_sigma_rels) for n in ema_nets}
    from diffusers.training_utils import EMAModel

    return {n: EMAModel(backend.ema_params(n), decay=t.ema_decay, use_ema_warmup=t.ema_warmup, foreach=True)
            for n in ema_nets if t.ema_decay > 0}


def _posthoc(emas: dict[str, Any]) -> dict[str, PowerEMA]:
    return {n: e for n, e in emas.items() if isinstance(e, PowerEMA)}


def _whole(backend: Any, name: str, ema: PowerEMA, i: int) -> dict[str, Tensor]:
    """Collective under DeepSpeed/FSDP2: profile i of net `name` whole, on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in backend.full_ema(name, ema.profiles[i]).items()}


def save_profiles(emas: dict[str, Any], backend: Any, path: Path, main: bool) -> None:
    """Every rank (a gather): the profiles after the first as ``posthoc_NET.safetensors`` in checkpoint `path`."""
    for n, ema in _posthoc(emas).items():
        tensors = {f"{i}/{k}": v for i in range(1, len(ema.profiles)) for k, v in _whole(backend, n, ema, i).items()}
        if main:
            save_file(tensors, str(ckpt.posthoc_file(path, n)))


def load_profiles(emas: dict[str, Any], backend: Any, path: Path, device: Any) -> None:
    """Every rank: the profiles after the first from checkpoint `path`, cut into this rank's share."""
    for n, ema in _posthoc(emas).items():
        f = ckpt.posthoc_file(path, n)
        if len(ema.profiles) > 1 and not f.is_file():
            raise GentrainError(f"checkpoint {path} has no {f.name}: it was not written with train.ema=posthoc")
        saved = load_file(str(f)) if len(ema.profiles) > 1 else {}
        for i in range(1, len(ema.profiles)):
            full = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"{i}/")}
            ema.profiles[i] = [s.to(device, torch.float32).clone() for s in backend.local_ema(n, full)]


def snapshot_if_due(emas: dict[str, Any], backend: Any, t: Any, step: int, run_dir: Path, main: bool,
                    partial: Iterable[str] = ()) -> None:
    """Every rank: at every train.posthoc_snapshot_every steps and at train.max_steps, every posthoc
    profile whole (and the net's buffers, e.g. BatchNorm statistics) to RUN/ema_snapshots/step_N."""
    ph = _posthoc(emas)
    if not ph or (step % t.posthoc_snapshot_every and step != t.max_steps):
        return
    tensors: dict[str, Tensor] = {}
    for n, ema in ph.items():
        for i in range(len(ema.profiles)):
            tensors.update({f"{n}/{i}/{k}": v for k, v in _whole(backend, n, ema, i).items()})
        if n not in partial:   # adapters only: the frozen base's buffers come from its source
            raw = backend.raw_nets[n]
            saved = set(raw.state_dict())   # persistent buffers only, as a checkpoint holds them
            tensors.update({f"{n}/buffers/{k}": b.detach().cpu().contiguous()
                            for k, b in raw.named_buffers() if k in saved})
    if not main:
        return
    first = next(iter(ph.values()))
    meta = {"step": str(step), "sigma_rels": json.dumps(first.sigma_rels), "gammas": json.dumps(first.gammas),
            "t": json.dumps({n: e.t for n, e in ph.items()})}
    final = ckpt.snapshot_file(run_dir, step)
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, final)   # a re-save of the same step (after a resume) replaces it
