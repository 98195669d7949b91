"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): the third backend, launched through
``accelerate launch --config_file <shipped fsdp2.yaml>``.

accelerate's launcher describes FSDP in the launched processes' environment
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``, ``FSDP_OFFLOAD_PARAMS``,
``FSDP_ACTIVATION_CHECKPOINTING``); gentrain reads those settings and calls ``fully_shard`` itself
(accelerate 1.16 never takes its FSDP path on CPU, and its one-model ``prepare`` does not fit the
two-network families), as it drives DeepSpeed's engines itself. The Accelerator is made as for
DDP, so the same file serves on GPUs (NCCL) and on CPU (gloo).

Each trained net is sharded on its own: every block of it (an item of a ``ModuleList``, the
outermost such level) gets its own ``fully_shard`` and then the net's root, so a net's weights
are gathered one block at a time; nets no phase trains stay whole. One optimizer per phase over
the sharded (DTensor) parameters; the EMA follows each rank's own shards (no gather per step) and
is gathered whole only to save, preview or evaluate. Checkpoints are the files a DDP run writes
(fsdp2_state), so `gentrain sample|eval|export` and DDP read an FSDP2 run as a DDP one, plus each
rank's own shards through DCP in safetensors (fsdp2_dcp), which an FSDP2 resume reads on any
process count.
"""
from __future__ import annotations

import copy
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from gentrain import checkpoint as ckpt
from gentrain.errors import GentrainError
from gentrain.distributed import fsdp2_state as st
from gentrain.distributed import portable
from gentrain.distributed.ddp import all_ranks_agree
from gentrain.distributed.twins import loaded_twins

_TRUE = ("1", "true", "yes")


def fsdp_requested(env: dict | None = None) -> bool:
    """Whether `accelerate launch` (its config file or --use_fsdp) asked for FSDP."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE


def settings(mixed_precision: str, env: dict | None = None) -> dict[str, Any]:
    """The FSDP2 settings of this launch from accelerate's environment, checked: one line for what
    cannot work here."""
    env = os.environ if env is None else env
    flag = lambda k: env.get(k, "false").lower() in _TRUE  # noqa: E731
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise GentrainError(f"the accelerate config asks for FSDP version {version}; gentrain trains with FSDP2 only: "
                            "set fsdp_version: 2 (the shipped config 'fsdp2' does)")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in ("true", "false"):
        raise GentrainError(f"fsdp_reshard_after_forward={reshard!r} is an FSDP1 strategy; FSDP2 takes true or false")
    cuda = torch.cuda.is_available()
    out = {"fsdp_version": 2, "reshard_after_forward": reshard == "true", "offload_params": flag("FSDP_OFFLOAD_PARAMS"),
           "activation_checkpointing": flag("FSDP_ACTIVATION_CHECKPOINTING"),
           "param_dtype": "bfloat16" if mixed_precision == "bf16" else "float32", "reduce_dtype": "float32",
           "shard": "each ModuleList block of a trained net, then the net; frozen nets whole",
           "device": "cuda" if cuda else "cpu (gloo)"}
    if mixed_precision == "fp16":
        raise GentrainError("train.mixed_precision=fp16 under FSDP2: gentrain's FSDP2 backend has no loss scaling "
                            "(and CPUs have no fp16 training); use train.mixed_precision=bf16")
    if out["offload_params"] and not cuda:
        raise GentrainError("fsdp_offload_params: true needs an accelerator: FSDP2's CPU offload pins host memory for "
                            "the device copies, and without one there is nothing to offload from; set it false")
    return out


def describe(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=1, sort_keys=True)


def check_setup(problem: str | None) -> None:
    """Refuse, before any training, what FSDP2 cannot train here (the family's fsdp_problem), in one line."""
    if problem:   # FSDP2 frees each block's gathered weights after its forward, as ZeRO-3 does
        raise GentrainError(f"FSDP2 cannot train this model: {problem}; train it with DDP or DeepSpeed ZeRO-2")


def blocks(net: nn.Module) -> list[nn.Module]:
    """The net's blocks to shard one by one: the items of its outermost ModuleLists that hold weights."""
    out: list[nn.Module] = []
    taken: list[str] = []
    for name, m in net.named_modules():
        if not isinstance(m, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        items = [c for c in m if any(True for _ in c.parameters())]
        if items:
            out += items
            taken.append(name)
    return out


def _autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """The module's forward under autocast, its outputs handed back in fp32 (as accelerate does for DDP)."""
    from accelerate.utils import convert_outputs_to_fp32

    module.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=dtype)(module.forward))


class FSDP2Backend:
    """One ``fully_shard``-ed module per trained net and one optimizer per phase over its DTensor
    parameters; the same methods as DDPBackend / DeepSpeedBackend."""

    kind = "fsdp2"
    reads = ("fsdp2", "ddp")   # kinds it resumes natively (the same whole files, any process count); others: portable.py

    def __init__(self, acc: Accelerator, nets: dict[str, nn.Module], phase_nets: list[tuple[str, ...]],
                 optimizers: list[torch.optim.Optimizer], cfg: dict[str, Any], partial: tuple[str, ...] = (),
                 hold: tuple[str, ...] = ()):
        """`partial`: nets that train adapters (LoRA) on a frozen base. They are sharded whole, the
        frozen base included (FSDP2 shards each parameter on its own and reduce-scatters only those
        with gradients, so a block mixing frozen and trained weights is one unit); their EMA and
        checkpoint files hold the trainable tensors only, as under DDP. `hold`: nets a loss
        differentiates twice through (a gradient penalty), kept gathered through each micro-step of
        the phases that train them (micro_step)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.acc, self.cfg, self.phase_nets = acc, cfg, phase_nets
        self.names = list(nets)
        trained = list(dict.fromkeys(n for ph in phase_nets for n in ph))
        # the old parameters' names, to build each phase's optimizer again over the sharded ones
        where = {id(p): (n, k) for n in trained for k, p in nets[n].named_parameters()}
        self.twins = {n: copy.deepcopy(nets[n]).to("cpu") for n in trained}   # whole copies to sample with
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        dtype = torch.bfloat16 if cfg["param_dtype"] == "bfloat16" else None
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                  output_dtype=torch.float32 if dtype else None)
        kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg["reshard_after_forward"], "mp_policy": mp}
        if cfg["offload_params"]:
            from torch.distributed.fsdp import CPUOffloadPolicy

            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        for n in trained:
            for block in blocks(nets[n]):
                if cfg["activation_checkpointing"]:   # recompute the block's activations in backward; in place:
                    from torch.distributed._composable import checkpoint   # parameter names stay as they are
                    checkpoint(block)
                fully_shard(block, **kw)
            fully_shard(nets[n], **kw)
            # FSDP2 takes the gradient and reduce dtypes from the parameters that require grad when the
            # net first runs forward, which for a GAN's generator is inside the disc phase, frozen: it
            # then kept bf16 gradients for fp32 shards ("attempting to assign a gradient with dtype
            # 'c10::BFloat16' to a tensor with grad_dtype 'Float'"). Initialise it now, as it trains.
            nets[n]._get_fsdp_state()._lazy_init()
            if dtype is not None:   # bf16 weights meet fp32 tensors made inside forward (a time embedding)
                _autocast_forward(nets[n], acc.device.type, dtype)
        self.nets = dict(nets)
        self.raw_nets = dict(nets)   # fully_shard changes the module's class in place: no wrapper
        new = {n: dict(nets[n].named_parameters()) for n in trained}
        for opt in optimizers:   # no step has run: point each group at the sharded parameters
            if opt.state:
                raise RuntimeError("FSDP2Backend needs optimizers that have not stepped yet")
            for g in opt.param_groups:
                g["params"] = [new[where[id(p)][0]][where[id(p)][1]] for p in g["params"]]
        self.optimizers = list(optimizers)
        self.params = [[p for g in o.param_groups for p in g["params"]] for o in self.optimizers]
        self.partial = {n: [k for k, p in nets[n].named_parameters() if p.requires_grad] for n in partial if n in nets}
        self.hold = [n for n in hold if n in self.twins]

    # ---- one optimizer step of a phase ---------------------------------------------------------
    @contextmanager
    def micro_step(self, phase: int, last: bool) -> Iterator[None]:
        """Gradients are reduce-scattered only on the last micro-step of an accumulation. A net of
        `hold` the phase trains stays gathered from its first forward to the end of the backward: a
        penalty's autograd.grad(create_graph=True) is a backward of its own, after which FSDP2 would
        free the gathered weights that the graph of that gradient holds, and the backward through it
        would read freed storage (torch 2.13: "setStorage: sizes [32, 32] ... out of bounds for
        storage of size 0"). Its gradients are still reduce-scattered, its optimizer state sharded."""
        for n in self.phase_nets[phase]:
            self.nets[n].set_requires_gradient_sync(last)
        held = [n for n in self.phase_nets[phase] if n in self.hold]
        for n in held:
            self.nets[n].set_reshard_after_forward(False)
            self.nets[n].set_reshard_after_backward(False)
        try:
            yield
        finally:
            if held:
                from torch.distributed.fsdp import FSDPModule
            for n in held:   # back to its shards, every block of it (reshard() acts on one FSDP unit)
                self.nets[n].set_reshard_after_forward(self.cfg["reshard_after_forward"])
                self.nets[n].set_reshard_after_backward(True)
                for m in self.nets[n].modules():
                    if isinstance(m, FSDPModule):
                        m.reshard()

    def loss_ok(self, phase: int, loss: Tensor) -> bool:
        return True   # decided after the backward, on the loss and the gradient norm together (as DDP)

    def backward(self, phase: int, loss: Tensor, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    def step(self, phase: int, params: list[nn.Parameter], loss: Tensor, max_norm: float) -> tuple[Tensor, bool]:
        """Clip (the norm over every rank's shards), check loss and norm are finite on every rank,
        then step or drop the gradients; returns (gradient norm, applied). `params` (the
        Trainer's, from before sharding) are not used: the phase's sharded ones are."""
        opt = self.optimizers[phase]
        norm = torch.nn.utils.clip_grad_norm_(self.params[phase], max_norm or math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = norm.detach().float().cpu()
        ok = all_ranks_agree(self.acc, torch.isfinite(loss.detach()).cpu() & torch.isfinite(norm))
        if ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm, ok

    def zero_grad(self, phase: int) -> None:
        self.optimizers[phase].zero_grad(set_to_none=True)

    def weight_tensors(self, name: str) -> list[Tensor]:
        """Every tensor that holds net `name`'s weights, for an in-place elementwise edit after a step
        (WGAN's clipping): each rank's shard of each parameter (the optimizer's own tensor)."""
        return [st.local(p).detach() for p in self.raw_nets[name].parameters()]

    # ---- EMA, sampling, checkpoints --------------------------------------------------------------
    def ema_names(self, name: str) -> list[str]:
        """What the EMA of net `name` follows: its parameters (a partial net's trainable ones)."""
        if name in self.partial:
            return list(self.partial[name])
        return [k for k, _ in self.raw_nets[name].named_parameters()]

    def _named(self, name: str) -> list[tuple[str, Tensor]]:
        params = dict(self.raw_nets[name].named_parameters())
        return [(k, params[k]) for k in self.ema_names(name)]

    def ema_params(self, name: str) -> list[Tensor]:
        return [st.local(p) for _, p in self._named(name)]

    def full_ema(self, name: str, shadow: list[Tensor]) -> dict[str, Tensor]:
        """Collective: the whole EMA of net `name` from every rank's shards."""
        return {k: st.whole(p, s) for (k, p), s in zip(self._named(name), shadow)}

    def local_ema(self, name: str, full: dict[str, Tensor]) -> list[Tensor]:
        return [st.shard_of(p, full[k]) for k, p in self._named(name)]

    @contextmanager
    def sampling_nets(self, main: bool, ema: dict[str, dict[str, Tensor]]) -> Iterator[dict[str, nn.Module]]:
        """Collective: the whole weights, EMA swapped in, loaded into the main rank's unsharded twins
        (frozen nets as they are), in eval mode; the other ranks get an empty dict."""
        full = {n: st.full_state_dict(self.raw_nets[n]) for n in self.twins}
        if not main:
            yield {}
            return
        frozen = {n: m for n, m in self.raw_nets.items() if n not in self.twins}
        modes = {n: m.training for n, m in frozen.items()}
        try:
            with loaded_twins(self.twins, full, ema, self.acc.device) as twins:
                yield {**{n: m.eval() for n, m in frozen.items()}, **twins}
        finally:
            for n, m in frozen.items():
                m.train(modes[n])

    def save(self, path: Path) -> None:
        """Every rank: the main rank writes each net's whole weights (model*.safetensors, the family's
        net order) and each phase's whole optimizer state (optimizer*.bin), as a DDP run does; every
        rank writes its shards of the trained nets and their optimizer state under fsdp2/ (DCP)."""
        from safetensors.torch import save_file

        main = self.acc.is_main_process
        for i, name in enumerate(self.names):   # a partial net: its trainable tensors only (the base is not gathered)
            sd = st.full_state_dict(self.raw_nets[name], self.partial.get(name))
            if main:
                save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt.model_file(path, i)))
        for i, opt in enumerate(self.optimizers):
            st.save_optimizer(opt, ckpt.optimizer_file(path, i), main)
        # and each rank's own shards (fsdp2/): what resumes an FSDP2 run without reading the whole files
        from gentrain.distributed import fsdp2_dcp as dcp_files   # here: DCP's import costs every launch ~0.1 s

        dcp_files.save(path, self._sharded(), self.partial, self.optimizers, self._opt_names(), main)

    def _sharded(self) -> dict[str, nn.Module]:
        return {n: self.raw_nets[n] for n in self.twins}

    def _opt_names(self) -> list[list[str]]:
        return [[f"{n}.{k}" for n, k in portable.param_names(o, self.raw_nets)] for o in self.optimizers]

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        """Every rank: an FSDP2 run's DCP shard files (each rank reads the pieces of its shards, any
        process count); else the whole files cut into this rank's shards (a DDP run's, or an FSDP2
        one's without fsdp2/; a DeepSpeed run's whole weights and optimizer state through portable.py)."""
        kind = saved.get("backend", "ddp")
        if kind not in self.reads:
            files = portable.weight_files(path, kind, saved.get("nets") or self.names, self.phase_nets)
            for name, f in files.items():
                st.load_weights(self.raw_nets[name], f, self.partial.get(name))
            phases = [portable.param_names(o, self.raw_nets) for o in self.optimizers]
            state = portable.whole_optimizer_state(path, kind, phases)
            for opt, names in zip(self.optimizers, phases):
                st.load_whole_optimizer(opt, portable.torch_state_dict(opt, names, state))
            return
        from gentrain.distributed import fsdp2_dcp as dcp_files

        if kind == "fsdp2" and dcp_files.present(path):   # each rank reads the pieces of its own shards
            dcp_files.load(path, self._sharded(), self.partial, self.optimizers, self._opt_names())
            for i, name in enumerate(self.names):   # frozen nets: their whole files
                if name not in self.twins:
                    st.load_weights(self.raw_nets[name], ckpt.model_file(path, i), self.partial.get(name))
            return
        for i, name in enumerate(self.names):
            st.load_weights(self.raw_nets[name], ckpt.model_file(path, i), self.partial.get(name))
        for i, opt in enumerate(self.optimizers):
            st.load_optimizer(opt, ckpt.optimizer_file(path, i))
