"""Portable checkpoints: any gentrain checkpoint resumed under any backend, from its whole files.

Every backend writes each net's whole weights (``model*.safetensors``) and the whole optimizer
state beside its own files: DDP and FSDP2 as accelerate's ``optimizer*.bin`` (one per phase, a
torch optimizer state dict of whole tensors indexed by parameter position, read with
``weights_only=True``), DeepSpeed as ``optimizer_NET.safetensors`` (each parameter's ``exp_avg``,
``exp_avg_sq`` by name, the step in the metadata). A backend resumes the kinds it lists in
``reads`` through its own fast path; any other kind (ZeRO <-> DDP / FSDP2) comes through here: the
whole weights and the whole optimizer state by (net, parameter name), which the loading backend
cuts into its own layout (replicated, DTensor shards, ZeRO shares). DeepSpeed's pickled files are
never read on this path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gentrain import checkpoint as ckpt
from gentrain.errors import GentrainError

# {net: (step, {parameter name: {state key: whole tensor}})}: an optimizer state whole, by name
WholeState = dict[str, tuple[float, dict[str, dict[str, Tensor]]]]


def param_names(opt: torch.optim.Optimizer, nets: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """(net, parameter name) of each of `opt`'s parameters, in the order its state dict indexes them."""
    where = {id(p): (n, k) for n, m in nets.items() for k, p in m.named_parameters()}
    return [where[id(p)] for g in opt.param_groups for p in g["params"]]


def weight_files(path: Path, kind: str, names: list[str], phase_nets: list[tuple[str, ...]]) -> dict[str, Path]:
    """Each net's whole-weights file in a checkpoint a `kind` run wrote: DDP and FSDP2 number every
    net of the family, DeepSpeed the trained ones (those with an engine), both in the family's order."""
    trained = {n for ph in phase_nets for n in ph}
    order = [n for n in names if kind != "deepspeed" or n in trained]
    files = {n: ckpt.model_file(path, i) for i, n in enumerate(order)}
    for n, f in files.items():
        if not f.is_file():
            raise GentrainError(f"checkpoint {path} has no {f.name} (net {n!r}): it cannot resume under another backend")
    return files


def read_torch_optimizer(f: Path) -> dict[str, Any]:
    """accelerate's optimizer file (a torch state dict of tensors), read with ``weights_only=True``."""
    if not f.is_file():
        raise GentrainError(f"checkpoint file {f} is missing")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's to fix
        raise GentrainError(f"could not read {f}: {str(e).splitlines()[0][:200]}") from None


def check_count(f: Path, sd: dict[str, Any], n_params: int, n_groups: int | None = None) -> None:
    groups = sd.get("param_groups", [])
    saved = sum(len(g["params"]) for g in groups)
    if saved != n_params or (n_groups is not None and len(groups) != n_groups):
        raise GentrainError(f"{f} holds the state of another optimizer ({saved} parameters; this one has {n_params})")


def whole_optimizer_state(path: Path, kind: str, phases: list[list[tuple[str, str]]]) -> WholeState:
    """The whole optimizer state a `kind` run saved in checkpoint `path`, by net and parameter name
    (`phases`: each phase optimizer's (net, parameter) in state-dict order, as `param_names` gives)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    out: WholeState = {}
    if kind == "deepspeed":
        for net in dict.fromkeys(n for ph in phases for n, _ in ph):
            f = ckpt.net_optimizer_file(path, net)
            if not f.is_file():
                raise GentrainError(f"checkpoint {path} has no {f.name} (an older checkpoint, or a DeepSpeed set-up "
                                    "whose optimizer state gentrain cannot map to parameters, such as ZeRO-0 in bf16): "
                                    "resume it the way it was launched")
            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
            per: dict[str, dict[str, Tensor]] = {}
            for name, t in load_file(str(f)).items():
                p, key = name.split("::", 1)
                per.setdefault(p, {})[key] = t
            out[net] = (float(meta.get("step", "0")), per)
        return out
    for i, names in enumerate(phases):   # DDP, FSDP2: one torch state dict per phase, by position
        f = ckpt.optimizer_file(path, i)
        sd = read_torch_optimizer(f)
        check_count(f, sd, len(names))
        for j, st in sd["state"].items():
            net, p = names[int(j)]
            step = st.get("step", 0)
            step = float(step.item() if torch.is_tensor(step) else step)
            tensors = {k: v for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
            _, per = out.setdefault(net, (step, {}))
            per[p] = tensors
    return out


def torch_state_dict(opt: torch.optim.Optimizer, names: list[tuple[str, str]], state: WholeState) -> dict[str, Any]:
    """A torch optimizer state dict for `opt` (its own param_groups; the LR schedule sets lr after)
    from the whole state by name: what a DDP or FSDP2 optimizer loads."""
    out: dict[int, dict[str, Any]] = {}
    for i, (net, p) in enumerate(names):
        step, per = state.get(net, (0.0, {}))
        if p in per:
            out[i] = {"step": torch.tensor(step, dtype=torch.float32), **per[p]}
    return {"state": out, "param_groups": opt.state_dict()["param_groups"]}
