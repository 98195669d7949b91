"""FSDP2's sharded checkpoint files: each rank writes its own shards through
``torch.distributed.checkpoint`` (DCP) with torch's safetensors storage, beside the whole files.

Layout under a checkpoint's ``fsdp2/`` folder (every file covered by the manifest):

- ``NET/shard-0000R-model-00001-of-00001.safetensors``: rank R-1's shard of each tensor of net NET
  (a LoRA net: its adapters), written by ``HuggingFaceStorageWriter(save_distributed=True)``; each
  file's safetensors header carries DCP's offsets of its pieces (JSON), so nothing is a pickle and
  no separate metadata file exists (``HuggingFaceStorageReader`` rebuilds the layout from the headers);
- ``optimizer_I/...``: phase I's per-parameter state tensors (Adam's ``exp_avg``, ``exp_avg_sq``),
  keyed ``NET.PARAM::NAME``, the same way;
- ``optimizer_I.json``: the phase's ``param_groups`` and each parameter's scalar state (the step).

DCP reads a piece of every saved shard that overlaps this rank's shard, so the files resume on any
process count. Every function here is a collective.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from gentrain.checkpoint import FSDP2_SHARDS as SHARDS
from gentrain.errors import GentrainError


def _save(tensors: dict[str, Tensor], folder: Path) -> None:
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))


def _load(tensors: dict[str, Tensor], folder: Path) -> None:
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise GentrainError(f"checkpoint folder {folder} holds no shard files")
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))
    except CheckpointException as e:   # what DCP raises for a missing key or a shape mismatch, on any rank
        raise GentrainError(f"{folder}: the shard files do not fit this net: {str(e).splitlines()[0][:300]}") from None


def _net_tensors(module: nn.Module, keys: list[str] | None) -> dict[str, Tensor]:
    """The module's state tensors (DTensors share the parameters' storage: a load writes into them)."""
    sd, keep = module.state_dict(), None if keys is None else set(keys)
    return {k: v for k, v in sd.items() if keep is None or k in keep}


def _is_shardable(v: Any) -> bool:
    return torch.is_tensor(v) and v.dim() > 0


def save(path: Path, nets: dict[str, nn.Module], partial: dict[str, list[str]],
         optimizers: list[torch.optim.Optimizer], opt_names: list[list[str]], main: bool) -> None:
    """`nets`: the sharded nets by name (a partial one's tensors `partial[name]` only); `opt_names`:
    each phase optimizer's parameters by `NET.PARAM`, in its groups' order."""
    root = path / SHARDS
    for name, module in nets.items():
        _save(_net_tensors(module, partial.get(name)), root / name)
    for i, (opt, names) in enumerate(zip(optimizers, opt_names)):
        params = [p for g in opt.param_groups for p in g["params"]]
        per = {name: opt.state[p] for name, p in zip(names, params) if p in opt.state}
        tensors = {f"{n}::{k}": v for n, st in per.items() for k, v in st.items() if _is_shardable(v)}
        if tensors:
            _save(tensors, root / f"optimizer_{i}")
        if main:
            state = {n: {"tensors": {k: str(v.dtype).removeprefix("torch.") for k, v in st.items() if _is_shardable(v)},
                         "scalars": {k: {"value": v.item(), "dtype": str(v.dtype).removeprefix("torch.")}
                                     if torch.is_tensor(v) else {"value": v}
                                     for k, v in st.items() if not _is_shardable(v)}}
                     for n, st in per.items()}
            (root / f"optimizer_{i}.json").write_text(json.dumps(
                {"param_groups": opt.state_dict()["param_groups"], "state": state}, indent=1))


def present(path: Path) -> bool:
    return (path / SHARDS).is_dir()


def load(path: Path, nets: dict[str, nn.Module], partial: dict[str, list[str]],
         optimizers: list[torch.optim.Optimizer], opt_names: list[list[str]]) -> None:
    """The sharded files of checkpoint `path` into the nets and the optimizers (any process count)."""
    root = path / SHARDS
    for name, module in nets.items():
        _load(_net_tensors(module, partial.get(name)), root / name)
    for i, (opt, names) in enumerate(zip(optimizers, opt_names)):
        f = root / f"optimizer_{i}.json"
        if not f.is_file():
            raise GentrainError(f"checkpoint file {f} is missing")
        saved = json.loads(f.read_text())
        if len(saved["param_groups"]) != len(opt.param_groups) or set(saved["state"]) - set(names):
            raise GentrainError(f"{f}: its optimizer state does not fit this phase's parameters")
        params = dict(zip(names, (p for g in opt.param_groups for p in g["params"])))
        state: dict[int, dict[str, Any]] = {}
        tensors: dict[str, Tensor] = {}
        for n, st in saved["state"].items():
            state[names.index(n)] = {k: torch.tensor(v["value"], dtype=getattr(torch, v["dtype"])) if "dtype" in v
                                     else v["value"] for k, v in st["scalars"].items()}
            for k, dtype in st["tensors"].items():
                tensors[f"{n}::{k}"] = torch.zeros_like(params[n], dtype=getattr(torch, dtype))
        if tensors:
            _load(tensors, root / f"optimizer_{i}")
        for key, t in tensors.items():
            n, k = key.split("::")
            state[names.index(n)][k] = t
        groups = [{**g, **{k: tuple(v) for k, v in g.items() if isinstance(live.get(k), tuple)}}
                  for g, live in zip(saved["param_groups"], opt.param_groups)]
        opt.load_state_dict({"state": state, "param_groups": groups})
